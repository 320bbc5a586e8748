"""Training an `SPAE` (SPAE-METHOD.md §4): appearance losses, semantic guidance, optional GAN, DDP, checkpoints.

Per step, with x the images, x' = decoder(z + sg(z_hat_L - z)) the reconstruction and z the encoder output:

    L_app = w_pix * pixel(x', x) + w_perc * perceptual(x', x) + commitment + lambda_gan * w_gan * hinge_G(D(x'))
    L_sem = semantic_loss(z_l(p) for the sampled positions p of the top L_sem layers, C_l(image))
    L     = L_app + alpha * L_sem,        alpha = alpha0 * sg(L_app / L_sem) ("dynamic") or alpha0 ("constant")

where z_l(p) are the SAQ targets (`SPAEQuantizer.layer_targets`), C_l the candidate sets of a relevance provider
(`spae_fast.relevance`) thresholded per layer (`spae_fast.semantic.candidates_from_relevance`), lambda_gan the
VQGAN adaptive weight, and the discriminator D (PatchGAN) is trained with the hinge loss plus LeCAM
regularisation. Without a relevance provider there is no semantic term.

Outputs in ``out_dir`` (written by rank 0):

    train_config.json    the `TrainConfig` and the model's `SPAEConfig`
    metrics.jsonl        one JSON object per logged step (loss terms, alpha, step time) and per evaluation
                         (PSNR of every layer prefix on held-out images, relevance of the top layers' words)
    samples/step_N.png   originals, then reconstructions from 1, 2, ..., L layers
    checkpoint/          the latest state: model (`SPAE.save_pretrained`), discriminator (safetensors),
                         trainer_state.pt (optimizer states, step; tensors only, loaded with weights_only=True)
                         and checkpoint.json (size and sha256 of each file). The folder is written whole beside
                         itself and swapped in (`spae_fast.checkpoint`): a kill leaves the previous or the new
                         checkpoint, and a resume verifies every file before it reads one.
    model/               the final model, for `SPAE.from_pretrained`

Every file is written atomically (`spae_fast._atomic`). A resume rewrites metrics.jsonl so that it ends at the
checkpoint's step: records written after the checkpoint (lost progress) are dropped, so each step appears once;
a run that does not resume starts it anew.

Multi-process: run under ``torchrun --nproc-per-node N``; `setup_distributed` joins the process group (gloo on
the CPU, nccl on GPUs), every rank reads its own shard of each epoch (`spae_fast.data.infinite_loader`) and
gradients are averaged by DDP. Each rank computes its own relevance and semantic loss for its shard. When the
work is done, drop the trainer and call `spae_fast.distributed.destroy_process_groups()` (``spae-fast train``
does): a process that exits with its gloo groups alive can abort at exit (its docstring says why).

Vocabulary parallel (``vocab_parallel=N``, ``spae-fast train --vocab-parallel N``): the world is split into a
``data x vocab`` grid (`spae_fast.distributed.vocab_parallel_groups`); the N ranks of a vocabulary group hold
1/N of the table each (`spae_fast.distributed.VocabParallelQuantizer`), share one batch and run the quantizer,
its semantic loss and evaluations as collectives; DDP averages gradients over the data group (the ranks that
hold the same shard). A model built on a `spae_fast.distributed.ShardedVocabCodebook` (what ``spae-fast train
--vocab-parallel`` does) never holds the whole table on any rank; a model built on a whole `VocabCodebook` is
split here, after every rank has loaded it. Checkpoints do not depend on N (the table is not in the
``state_dict``; resuming reads the weights only).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ._atomic import atomic_write_json
from ._integrity import CorruptFileError, load_safetensors
from .checkpoint import (
    read_model_checkpoint,
    save_training_checkpoint,
    truncate_metrics,
    verify_training_checkpoint,
)
from .evaluation import evaluate_model
from .losses import (
    LeCAMRegularizer,
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_gan_weight,
    dynamic_semantic_weight,
    hinge_d_loss,
    hinge_g_loss,
    pixel_loss,
    psnr,
)
from .model import SPAE, SPAEConfig
from .ops import SEMANTIC_PRECISIONS, semantic_loss
from .semantic import (
    DEFAULT_THRESHOLDS,
    RelevanceProvider,
    candidates_from_relevance,
    pyramid_set_of_position,
)
from .word_accuracy import class_word_similarity, evaluate_words

TRAINER_STATE = "trainer_state.pt"
SEMANTIC_WEIGHTINGS = ("layer", "position")
DISCRIMINATOR_WEIGHTS = "discriminator.safetensors"


@dataclasses.dataclass
class TrainConfig:
    """Optimisation and loss settings (every weight configurable; defaults suit the digits demo)."""

    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 4e-4
    adam_betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    pixel_loss: str = "l2"  # "l2" | "l1"
    pixel_weight: float = 1.0
    # Pixel loss of each image decoded from a shorter prefix of its layers (image b of step s: prefix
    # 1 + (b + s) mod (L - 1), so every prefix is trained equally), in the full reconstruction's decoder call.
    # The prefix's latent is detached (words are discrete): only the decoder learns to render 1, 2, ... layers.
    # Not part of L_app, so the dynamic semantic weight and the GAN's adaptive weight are unchanged. 0: off
    # (the decoder then only ever sees all L layers, and 1 or 2 words decode to near-blank images). On the
    # digits demo 0.1 made PSNR rise with every layer in every seed, its full PSNR moving within the seeds'
    # spread; 0.5 cost 1.5-3 dB of full PSNR (docs/DECISIONS.md, "Prefix training").
    prefix_weight: float = 0.1
    perceptual_weight: float = 0.0  # needs perceptual_network
    perceptual_network: str | None = None  # torchvision-format VGG16 weights (.safetensors / .pth)
    gan_weight: float = 0.0  # 0: no discriminator
    gan_start: int = 0  # step at which the GAN terms switch on
    discriminator_lr: float = 4e-4
    discriminator_channels: int = 64
    lecam_weight: float = 0.001
    semantic_layers: int = 3  # top pyramid layers that get semantic guidance
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS  # rho_l per semantic layer
    tau: float = 1.0  # semantic softmax temperature
    # tau per guided layer, top first (None: `tau` for every layer). SAQ's layer-l target l z - sum e moves l times
    # as far as z does, so its logits' z term is l-fold steeper than RQ's at the same tau (docs/DECISIONS.md,
    # "Semantic weighting": the demo gives layer 2 tau 2).
    semantic_layer_taus: tuple[float, ...] | None = None
    # precision of the fused semantic loss (`spae_fast.semantic_loss`): "bf16" (z and the table rounded to bf16,
    # fp32 accumulation; about 2x faster on AVX512-BF16 CPUs; the loss moved by 1.2e-6 relative on the benchmark
    # problem) or "default" (fp32). A guidance term with a dynamic weight does not need fp32 logits.
    semantic_precision: str = "bf16"
    # alpha0: the semantic term's share of L_app (split among the guided layers with "layer" weighting); too
    # small a share leaves the words off their class (docs/DECISIONS.md, "Semantic weighting").
    alpha0: float = 10.0
    alpha_mode: str = "dynamic"  # "dynamic" | "constant"
    # How the top layers share the semantic term. "layer": each layer's loss is the mean over its positions with
    # its own weight alpha0 * w_l / sum(w) * sg(L_app / L_sem_l), so the single layer-1 word counts as much as
    # layer 3's 16. "position": one mean over all guided positions, one weight (layer 1 gets 1/21 of the term).
    semantic_weighting: str = "layer"
    semantic_layer_shares: tuple[float, ...] | None = None  # w per guided layer, top first ("layer"; None: equal)
    semantic_classes: tuple[int, ...] | None = None  # only images of these labels get guidance (None: all)
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 100
    eval_images: int = 8
    # held-out images whose words are judged at each evaluation (word -> class accuracy of layers 1..n for
    # n <= semantic_layers, `spae_fast.word_accuracy`); needs labels and class names
    word_eval_images: int = 256
    seed: int = 0
    max_minutes: float | None = None  # stop (and save) once training has run this long

    def __post_init__(self) -> None:
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        self.thresholds = tuple(float(t) for t in self.thresholds)
        if self.semantic_classes is not None:
            self.semantic_classes = tuple(int(c) for c in self.semantic_classes)
        if self.pixel_loss not in ("l2", "l1"):
            raise ValueError(f"pixel_loss must be 'l2' or 'l1', got {self.pixel_loss!r}")
        if self.alpha_mode not in ("dynamic", "constant"):
            raise ValueError(f"alpha_mode must be 'dynamic' or 'constant', got {self.alpha_mode!r}")
        if self.semantic_weighting not in SEMANTIC_WEIGHTINGS:
            raise ValueError(f"semantic_weighting must be one of {SEMANTIC_WEIGHTINGS}, got {self.semantic_weighting!r}")
        for name in ("steps", "batch_size", "log_every", "eval_every", "save_every", "eval_images", "semantic_layers",
                     "word_eval_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, needs_layer_weighting in (("semantic_layer_shares", True), ("semantic_layer_taus", False)):
            values = getattr(self, name)
            if values is None:
                continue
            if ((needs_layer_weighting and self.semantic_weighting != "layer") or isinstance(values, str)
                    or len(values) != self.semantic_layers
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                               for v in values)):  # fmt: skip
                weighting = ", with semantic_weighting='layer'" if needs_layer_weighting else ""
                raise ValueError(f"{name} must be {self.semantic_layers} positive finite numbers (one per semantic "
                                 f"layer{weighting}), got {values!r}")  # fmt: skip
            setattr(self, name, tuple(float(v) for v in values))
        if len(self.thresholds) < self.semantic_layers:
            raise ValueError(
                f"thresholds has {len(self.thresholds)} values but semantic_layers={self.semantic_layers} needs one "
                "per semantic layer"
            )
        if self.perceptual_weight > 0 and not self.perceptual_network:
            raise ValueError("perceptual_weight > 0 needs perceptual_network (a VGG16 weights file)")
        if not self.prefix_weight >= 0:
            raise ValueError(f"prefix_weight must be >= 0, got {self.prefix_weight}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.semantic_precision not in SEMANTIC_PRECISIONS:
            raise ValueError(
                f"semantic_precision must be one of {SEMANTIC_PRECISIONS}, got {self.semantic_precision!r}"
            )


def setup_distributed() -> tuple[int, int]:
    """(rank, world size); joins the default process group when launched by torchrun with WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Trains ``model`` on ``dataset`` (items ``(image [3, S, S] in [-1, 1], label)``).

    Args:
        model: the `SPAE` to train (its codebook stays frozen).
        config: a `TrainConfig`.
        out_dir: where metrics, samples and checkpoints go.
        dataset: training images.
        eval_dataset: held-out images for PSNR / relevance evaluations (default: ``dataset``).
        relevance: a relevance provider (``provider(images, labels) -> [B, V]``) or None (no semantic loss).
        device: where to train.
        word_similarity: ``[C, V]`` class name to token similarity that evaluations judge the words with (word ->
            class accuracy, `spae_fast.word_accuracy`); default: the relevance provider's own
            ``class_word_similarity`` of the dataset's ``class_names``, when both exist.
        vocab_parallel: N > 1 splits the quantizer's table over groups of N ranks (module docstring); N must
            divide the world size. 1 (default): every rank holds the whole table.
    """

    def __init__(
        self,
        model: SPAE,
        config: TrainConfig,
        out_dir: str | os.PathLike,
        dataset: torch.utils.data.Dataset,
        *,
        eval_dataset: torch.utils.data.Dataset | None = None,
        relevance: RelevanceProvider | None = None,
        device: torch.device | str = "cpu",
        word_similarity: torch.Tensor | None = None,
        vocab_parallel: int = 1,
    ) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        self.rank, self.world_size = setup_distributed()
        from .distributed import check_vocab_parallel, split_vocabulary

        check_vocab_parallel(vocab_parallel, self.world_size)
        self.vocab_parallel = vocab_parallel
        self.model = model.to(self.device)
        self.vocab_group, data_group = split_vocabulary(model, vocab_parallel)  # (None, None) for 1
        self.dataset = dataset
        self.eval_dataset = eval_dataset if eval_dataset is not None else dataset
        self.relevance = relevance
        if relevance is not None and relevance.num_rows != model.vocab.num_rows:
            raise ValueError(
                f"the relevance provider scores {relevance.num_rows} tokens but the codebook has "
                f"{model.vocab.num_rows} rows"
            )
        self.class_names = getattr(dataset, "class_names", None)
        if word_similarity is None and self.class_names and hasattr(relevance, "class_word_similarity"):
            word_similarity = class_word_similarity(relevance, self.class_names)
        self.word_similarity = word_similarity
        if config.semantic_layers > model.num_layers:
            raise ValueError(f"semantic_layers={config.semantic_layers} > the model's {model.num_layers} layers")
        torch.manual_seed(config.seed)
        self.network: nn.Module = model
        if self.data_world_size > 1:
            # The quantizer's buffers (the frozen codebook, up to GBs) are the same on every rank: keep DDP from
            # broadcasting them at start-up and before every forward.
            frozen = [f"quantizer.{name}" for name, _ in model.quantizer.named_buffers()]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
            self.network = nn.parallel.DistributedDataParallel(model, process_group=data_group)
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=config.learning_rate, betas=config.adam_betas, weight_decay=config.weight_decay
        )
        self.discriminator = self.lecam = self.discriminator_network = self.discriminator_optimizer = None
        if config.gan_weight > 0:
            self.discriminator = PatchDiscriminator(
                model.config.in_channels, config.discriminator_channels, image_size=model.config.image_size
            ).to(self.device)
            self.lecam = LeCAMRegularizer().to(self.device)
            self.discriminator_network = self.discriminator
            if self.data_world_size > 1:
                self.discriminator_network = nn.parallel.DistributedDataParallel(self.discriminator,
                                                                                 process_group=data_group)
            self.discriminator_optimizer = torch.optim.Adam(
                self.discriminator.parameters(), lr=config.discriminator_lr, betas=config.adam_betas
            )
        self.perceptual = None
        if config.perceptual_weight > 0:
            self.perceptual = PerceptualLoss.vgg16(config.perceptual_network).to(self.device)
        self.step = 0
        self.elapsed = 0.0  # training seconds over all runs of this out_dir (resumes add to it)

    # ---- one step ------------------------------------------------------------------------------------------

    def semantic_term(self, latent: torch.Tensor, ids: list[torch.Tensor], images: torch.Tensor,
                      labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The semantic loss of each top layer ``[L_sem]``: the mean over its guided positions of the SAQ target's
        cross-entropy against the image's candidate set (NaN for a layer with no guided position); and the mean
        over all guided positions ``[]``."""
        layers = self.config.semantic_layers
        quantizer = self.model.quantizer
        with torch.no_grad():
            relevance = self.relevance(images, labels)  # [B, V]
        index, offsets = candidates_from_relevance(relevance, self.config.thresholds[:layers])
        sets = pyramid_set_of_position(images.shape[0], quantizer.layers[:layers], latent.device)
        if self.config.semantic_classes is not None:  # the other images' positions get no set: excluded
            guided = torch.isin(labels, torch.tensor(self.config.semantic_classes, device=labels.device))
            sets = torch.where(guided[:, None], sets, -1)
        targets = quantizer.layer_targets(latent, ids, layers)  # [B, n, D]
        counts = [side * side for side in quantizer.layers[:layers]]
        options = {"precision": self.config.semantic_precision, "reduction": "none"}

        def cross_entropy(targets: torch.Tensor, sets: torch.Tensor, tau: float) -> torch.Tensor:
            if self.vocab_parallel > 1:  # the VocabParallelQuantizer's loss on its sharded table (a collective)
                return quantizer.semantic_loss(targets, index, offsets, sets, tau=tau, **options)
            return semantic_loss(targets, quantizer.codebook, index, offsets, sets, tau=tau, **options)

        if self.config.semantic_layer_taus is None:
            per_position = cross_entropy(targets, sets, self.config.tau)
        else:  # one call per layer, each at its own tau
            per_position = torch.cat([cross_entropy(t.contiguous(), s.contiguous(), tau) for t, s, tau in zip(
                targets.split(counts, dim=1), sets.split(counts, dim=1), self.config.semantic_layer_taus)], dim=1)
        # per_position: [B, n], 0 where excluded
        sizes = offsets[1:] - offsets[:-1]
        counted = ((sets >= 0) & (sizes[sets.clamp_min(0)] > 0)).to(per_position.dtype)  # [B, n]
        per_layer = torch.stack([
            loss.sum() / weight.sum() if weight.sum() > 0 else loss.sum() * math.nan
            for loss, weight in zip(per_position.split(counts, dim=1), counted.split(counts, dim=1))
        ])  # fmt: skip
        return per_layer, per_position.sum() / counted.sum().clamp_min(1)

    def weighted_semantic(self, appearance: torch.Tensor, per_layer: torch.Tensor,
                          per_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """(alpha * L_sem, L_sem, alpha) (`TrainConfig.semantic_weighting`). "layer": L_sem is the mean of the
        guided layers' losses, each weighted on its own (alpha_l = alpha0 * w_l / sum(w) * sg(L_app / L_sem_l) when
        dynamic; w: `TrainConfig.semantic_layer_shares`, equal by default),
        alpha the effective weight; "position": L_sem is the mean over all guided positions, with one weight."""
        config = self.config
        if config.semantic_weighting == "position":
            alpha = dynamic_semantic_weight(appearance, per_position, config.alpha0, config.alpha_mode)
            return alpha * per_position, per_position, alpha
        present = ~per_layer.isnan()
        guided = per_layer[present]
        if guided.numel() == 0:  # no image of the batch is guided
            return per_position, per_position, per_position.new_zeros(())
        shares = [1.0] * per_layer.numel() if config.semantic_layer_shares is None else config.semantic_layer_shares
        shares = [w for w, kept in zip(shares, present.tolist()) if kept]  # the layers this batch guides
        weighted = sum(dynamic_semantic_weight(appearance, loss, config.alpha0 * w / sum(shares), config.alpha_mode)
                       * loss for loss, w in zip(guided, shares))  # fmt: skip
        semantic = guided.mean()
        return weighted, semantic, (weighted / semantic.clamp_min(1e-12)).detach()

    def prefix_layers(self, batch: int) -> torch.Tensor | None:
        """The shorter prefix each image of this step is also decoded from (None: prefix training off): image j
        of the joint batch at step s gets 1 + (j + s) mod (L - 1). Rank r's image i is image i W + r of the joint
        batch (`spae_fast.data.infinite_loader` interleaves the ranks' shards), so W processes train the same
        prefixes as one process with the joint batch."""
        shorter = self.model.num_layers - 1
        if self.config.prefix_weight == 0 or shorter == 0:
            return None
        joint_index = torch.arange(batch, device=self.device) * self.data_world_size + self.data_rank
        return 1 + (joint_index + self.step) % shorter

    @property
    def data_rank(self) -> int:
        """This rank's data-parallel replica (the ranks of one vocabulary group share a batch)."""
        return self.rank // self.vocab_parallel

    @property
    def data_world_size(self) -> int:
        """The number of data-parallel replicas."""
        return self.world_size // self.vocab_parallel

    @property
    def _evaluates(self) -> bool:
        """Whether this rank runs evaluations: rank 0, and the rest of its vocabulary group."""
        return self.rank < self.vocab_parallel

    def gan_active(self) -> bool:
        return self.discriminator is not None and self.step >= self.config.gan_start

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        config = self.config
        self.model.train()
        images, labels = images.to(self.device), labels.to(self.device)
        out = self.network(images, self.prefix_layers(images.shape[0]))
        reconstruction = out.reconstruction
        terms: dict[str, torch.Tensor] = {}
        terms["pixel"] = pixel_loss(reconstruction, images, config.pixel_loss)
        reconstruction_loss = config.pixel_weight * terms["pixel"]
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(reconstruction, images)
            reconstruction_loss = reconstruction_loss + config.perceptual_weight * terms["perceptual"]
        terms["commitment"] = out.quantizer.loss
        appearance = reconstruction_loss + out.quantizer.loss
        if self.gan_active():
            for parameter in self.discriminator.parameters():
                parameter.requires_grad_(False)
            terms["gan_generator"] = hinge_g_loss(self.discriminator_network(reconstruction))
            for parameter in self.discriminator.parameters():
                parameter.requires_grad_(True)
            terms["gan_lambda"] = adaptive_gan_weight(
                reconstruction_loss, terms["gan_generator"], self.model.decoder.last_layer
            )
            appearance = appearance + config.gan_weight * terms["gan_lambda"] * terms["gan_generator"]
        total = appearance
        if self.relevance is not None:
            per_layer, per_position = self.semantic_term(out.latent, out.quantizer.ids, images, labels)
            weighted, terms["semantic"], terms["alpha"] = self.weighted_semantic(appearance, per_layer, per_position)
            for layer, loss in enumerate(per_layer.detach(), 1):
                terms[f"semantic_layer_{layer}"] = loss
            total = appearance + weighted
        if out.prefix_reconstruction is not None:
            terms["prefix_pixel"] = pixel_loss(out.prefix_reconstruction, images, config.pixel_loss)
            total = total + config.prefix_weight * terms["prefix_pixel"]
        terms["total"] = total
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if config.grad_clip > 0:
            terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()

        if self.gan_active():
            logits_real = self.discriminator_network(images)
            logits_fake = self.discriminator_network(reconstruction.detach())
            terms["gan_discriminator"] = hinge_d_loss(logits_real, logits_fake)
            terms["lecam"] = self.lecam(logits_real, logits_fake)
            discriminator_loss = terms["gan_discriminator"] + config.lecam_weight * terms["lecam"]
            self.discriminator_optimizer.zero_grad(set_to_none=True)
            discriminator_loss.backward()
            self.discriminator_optimizer.step()
        metrics = {name: float(value.detach()) for name, value in terms.items()}
        metrics["psnr"] = float(psnr(reconstruction.detach(), images).mean())
        for layer, error in enumerate(out.quantizer.layer_errors.tolist(), 1):
            metrics[f"latent_error_{layer}"] = error
        return metrics

    # ---- evaluation ----------------------------------------------------------------------------------------

    def eval_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        count = min(self.config.eval_images, len(self.eval_dataset))
        items = [self.eval_dataset[i] for i in range(count)]
        return torch.stack([image for image, _ in items]), torch.as_tensor([int(label) for _, label in items])

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, object]:
        """PSNR of every layer prefix (and the relevance of the semantic layers' words when there is a provider)
        on ``images``; also returns the reconstructions per prefix under ``"reconstructions"``."""
        return evaluate_model(self.model, images.to(self.device), labels, self.relevance, self.config.semantic_layers)

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def save_checkpoint(self, folder: Path | None = None) -> Path:
        """Model, discriminator and optimizer state into ``out_dir/checkpoint`` (rank 0 only), as one unit: a kill
        at any point leaves the previous checkpoint or this one (`spae_fast.checkpoint`)."""
        folder = folder or self.out_dir / "checkpoint"
        if self.rank != 0:
            return folder
        from safetensors.torch import save

        files: dict[str, bytes] = {}
        state = {"step": self.step, "elapsed": self.elapsed, "optimizer": self.optimizer.state_dict()}
        if self.discriminator is not None:
            files[DISCRIMINATOR_WEIGHTS] = save(
                {k: v.detach().contiguous().cpu() for k, v in self.discriminator.state_dict().items()}
                | {f"lecam.{k}": v.detach().contiguous().cpu() for k, v in self.lecam.state_dict().items()}
            )
            state["discriminator_optimizer"] = self.discriminator_optimizer.state_dict()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        files[TRAINER_STATE] = buffer.getvalue()
        return save_training_checkpoint(folder, self.model, files, self.step)

    def load_checkpoint(self, folder: Path | None = None) -> None:
        """Restores what `save_checkpoint` wrote, after checking every file against the checkpoint's manifest
        (the model also through `SPAE.from_pretrained`'s checks)."""
        folder, manifest = verify_training_checkpoint(folder or self.out_dir / "checkpoint", TRAINER_STATE)
        # The weights and config only: no second model (nor a second copy of the table) is built.
        saved_config, saved_state = read_model_checkpoint(folder, SPAEConfig)
        if saved_config != self.model.config:
            raise ValueError(f"cannot resume: the checkpoint's model config differs from this run's ({folder})")
        try:
            state = torch.load(folder / TRAINER_STATE, map_location=self.device, weights_only=True)
            step, elapsed = int(state["step"]), float(state.get("elapsed", 0.0))
        except Exception as error:  # noqa: BLE001  (a legacy checkpoint has no manifest to catch a damaged file)
            raise CorruptFileError(f"cannot resume: {folder / TRAINER_STATE} is not a readable trainer state: {error}") from None
        if manifest is not None and step != manifest["step"]:
            raise CorruptFileError(f"cannot resume: {folder / TRAINER_STATE} holds step {step}, its manifest {manifest['step']}")
        if self.discriminator is not None:
            weights = load_safetensors(folder / DISCRIMINATOR_WEIGHTS, device=self.device)
            self.discriminator.load_state_dict({k: v for k, v in weights.items() if not k.startswith("lecam.")})
            self.lecam.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("lecam.")})
            self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.model.load_state_dict(saved_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.elapsed = step, elapsed

    # ---- the loop ------------------------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out_dir / "metrics.jsonl", "a") as file:
                file.write(json.dumps(record) + "\n")

    def _evaluate_and_save_samples(self) -> dict[str, object]:
        """Rank 0 evaluates the held-out batch, logs it and writes the sample grid; other ranks return {} (with a
        vocabulary-parallel quantizer the other ranks of rank 0's vocabulary group evaluate with it: the
        quantizer is a collective)."""
        if not self._evaluates:
            return {}
        from .imaging import save_grid

        images, labels = self.eval_batch()
        result = self.evaluate(images, labels)
        if self.word_similarity is not None:
            words = evaluate_words(self.model, self.eval_dataset, self.word_similarity, self.config.semantic_layers,
                                   self.class_names, limit=self.config.word_eval_images)  # fmt: skip
            result["word_accuracy"] = [round(w.accuracy, 4) for w in words]
            result["contains_class_name"] = [round(w.contains_class_name, 4) for w in words]
            result["word_accuracy_chance"] = round(words[0].chance, 4)
            result["word_accuracy_images"] = words[0].images
        reconstructions = result.pop("reconstructions")
        if self.rank != 0:
            return result
        rows = [images] + reconstructions
        labels_text = ["input"] + [f"{n} layer{'s' if n > 1 else ''}" for n in range(1, len(reconstructions) + 1)]
        save_grid(self.out_dir / "samples" / f"step_{self.step:06d}.png", rows, row_labels=labels_text)
        self._log({"step": self.step, "eval": result})
        return result

    def fit(self, resume: bool = False, progress: bool = True) -> dict[str, object]:
        """Trains to ``config.steps`` (or ``max_minutes``), evaluating, logging and checkpointing on the way;
        writes the final model to ``out_dir/model``. Returns the last evaluation and timings."""
        from .data import infinite_loader

        config = self.config
        if self.rank == 0:
            (self.out_dir / "samples").mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out_dir / "train_config.json",
                              {"train": dataclasses.asdict(config), "model": self.model.config.to_dict(),
                               "world_size": self.world_size, "vocab_parallel": self.vocab_parallel})  # fmt: skip
        if resume:
            self.load_checkpoint()
        last_eval: dict[str, object] = {}
        last_eval_step = -1
        if self.rank == 0:  # metrics.jsonl restarts at this step: each step is logged once
            logged = truncate_metrics(self.out_dir / "metrics.jsonl", self.step)
            if logged is not None and isinstance(logged.get("eval"), dict):
                last_eval, last_eval_step = logged["eval"], self.step
        loader: Iterator = infinite_loader(
            self.dataset, config.batch_size, config.seed, self.data_rank, self.data_world_size, start_step=self.step
        )
        bar = None
        if progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.steps, initial=self.step, desc="train", dynamic_ncols=True)
        started, step_times = time.perf_counter(), []
        elapsed_before = self.elapsed
        try:  # the bar is closed even when a step raises, so an error message starts on its own line
            while self.step < config.steps:
                if config.max_minutes is not None and self.elapsed >= 60 * config.max_minutes:
                    break
                images, labels = next(loader)
                tic = time.perf_counter()
                metrics = self.train_step(images, labels)
                step_times.append(time.perf_counter() - tic)
                self.step += 1
                self.elapsed = elapsed_before + time.perf_counter() - started
                if self.step % config.log_every == 0 or self.step == config.steps:
                    self._log({"step": self.step, "seconds": round(self.elapsed, 3),
                               "step_seconds": round(step_times[-1], 4), **metrics})  # fmt: skip
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['total']:.4f}", psnr=f"{metrics['psnr']:.2f}")
                if self.step % config.eval_every == 0:
                    last_eval, last_eval_step = self._evaluate_and_save_samples(), self.step
                if self.step % config.save_every == 0:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        final_eval = last_eval_step != self.step
        if self.vocab_parallel > 1 and self._evaluates:  # rank 0 alone read the metrics: its choice for the group
            flag = torch.tensor([int(final_eval)], device=self.device)
            dist.broadcast(flag, src=0, group=self.vocab_group)
            final_eval = bool(flag.item())
        if final_eval:
            last_eval = self._evaluate_and_save_samples()
        self.save_checkpoint()
        if self.rank == 0:
            self.model.save_pretrained(self.out_dir / "model")
        median = sorted(step_times)[len(step_times) // 2] if step_times else math.nan
        return {"step": self.step, "seconds": self.elapsed, "median_step_seconds": median, "eval": last_eval}
