"""The sanitizer job (scripts/sanitize.sh) really runs sanitized code: the ASan and UBSan runtimes are loaded into
this process, the spae_fast._C under test is the instrumented build, and a deliberate heap overflow in the
native search is reported by AddressSanitizer.

Runs only inside that job (it sets SPAE_FAST_SANITIZED_SITE); skipped in the normal suite."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

SITE = os.environ.get("SPAE_FAST_SANITIZED_SITE")
pytestmark = pytest.mark.skipif(not SITE, reason="only in the sanitizer job (scripts/sanitize.sh)")


def test_runtimes_are_loaded():
    process = ctypes.CDLL(None)
    assert hasattr(process, "__asan_init"), "the AddressSanitizer runtime is not loaded (LD_PRELOAD)"
    with open("/proc/self/maps") as maps:
        mapped = maps.read()
    assert "libasan" in mapped and "libubsan" in mapped


def test_native_module_is_the_instrumented_build():
    from spae_fast import _native

    path = os.path.realpath(_native._C.__file__)
    assert path.startswith(os.path.realpath(SITE)), f"spae_fast._C comes from {path}, not from {SITE}"
    with open(path, "rb") as module:
        binary = module.read()
    assert b"__asan_report_load" in binary, "spae_fast._C has no ASan instrumentation"
    assert b"__ubsan_handle_" in binary, "spae_fast._C has no UBSan instrumentation"


OVERFLOW = textwrap.dedent(
    """
    import torch
    from spae_fast import _native
    C = _native.cpu_module()

    def buffer(tensor, claimed_bytes=None):
        # the native boundary takes (address, nbytes) and refuses a buffer shorter than what it reads; this
        # one claims more bytes than the tensor holds, which no torch-free boundary can see through
        if not hasattr(_native, "buffer"):  # an older boundary: bare addresses
            return tensor.data_ptr()
        address, nbytes = _native.buffer(tensor)
        return address, nbytes if claimed_bytes is None else claimed_bytes

    weight, x = torch.randn(3000, 8), torch.randn(4, 8)
    small = weight[:16].contiguous()
    panels, bias = torch.empty(1, 8, 16), torch.empty(16)  # one panel: 16 rows, 512 bytes
    code, _, max_norm = C.pack_codebook(
        weight=buffer(small), num_rows=16, dim=8, weight_row_stride=8, weight_col_stride=1, weight_dtype=0,
        metric=0, out_panels=buffer(panels), out_panels_dtype=0, out_bias=buffer(bias), num_threads=1)
    assert code == 0
    dist, index = torch.empty(4, 1), torch.empty(4, 1, dtype=torch.int64)
    num_panels = -(-3000 // 16)
    C.search(  # told V = 3000 rows: the kernel reads 187 panels past the end of the one-panel buffer
        x=buffer(x), num_queries=4, dim=8, x_row_stride=8, x_col_stride=1, x_dtype=0,
        panels=buffer(panels, num_panels * 8 * 16 * 4), panels_dtype=0, bias=buffer(bias, num_panels * 16 * 4),
        codebook_rows=3000, max_norm=max_norm, metric=0, k=1, check_finite=True, num_threads=1,
        out_dist=buffer(dist), out_index=buffer(index), weight=buffer(weight), weight_row_stride=8,
        weight_col_stride=1, weight_dtype=0, prefilter_panels=buffer(x[:0]), prefilter_columns=buffer(x[:0]),
        prefilter_offsets=buffer(x[:0]), prefilter_bounds=[], prefilter_adaptive=False)
    print("NOT REPORTED")
    """
)


def test_a_heap_overflow_in_the_native_search_is_reported():
    """The raw native entry point trusts the buffer sizes it is given: told 3000 rows and a one-panel buffer said
    to hold 188 panels, it reads past the buffer, which ASan must report (in a child process, whose report goes
    to its stderr, not the job's logs)."""
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1"  # no log_path: this report is expected
    result = subprocess.run(
        [sys.executable, "-c", OVERFLOW],
        check=False,
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "NOT REPORTED" not in result.stdout
    assert result.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in result.stderr, result.stderr[-3000:]
