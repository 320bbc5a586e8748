"""A frozen LLM reading and writing SPAE words in context (SPAE-METHOD.md §5), one module per job:

- `loading`: a causal LM from a folder, a Hub id, a GGUF file or ``"smollm2"`` (GGUF converted once to a
  cached safetensors folder);
- `frozen_lm`: `FrozenLM`, the frozen model with prompt pieces, shared-prefix scoring and greedy decoding;
- `image_tokens`: `ImageVocabulary`, SPAE ids as LLM prompt tokens (the LLM's own ids, or text);
- `constrained`: decoding restricted to whole codebook words;
- `fewshot`: N-way K-shot episodes, their prompts, accuracy with a Wilson interval;
- `generation`: progressive in-context generation of a token pyramid (denoising, image-to-image);
- `image_tasks`: the image transforms of image-to-image tasks.

The LLM is never updated.
"""

from .fewshot import (
    FEWSHOT_METHODS,
    LABEL_KINDS,
    NONSENSE_LABELS,
    Episode,
    EpisodePrompt,
    EpisodeRecord,
    FewShotResult,
    build_episode_prompt,
    evaluate_fewshot,
    sample_episodes,
    task_induction_text,
    wilson_interval,
)
from .frozen_lm import SHARING_STRATEGIES, TREE_MAX_TOKENS, FrozenLM
from .generation import (
    DENOISE_RATES,
    GenerationStep,
    ProgressiveResult,
    corrupt_ids,
    denoise,
    denoising_rates,
    generate_progressive,
    generation_steps,
    image_to_image,
)
from .image_tasks import IMAGE_TASKS, flip_images, mask_images, shift_images, task_pairs
from .image_tokens import IMAGE_TOKEN_MODES, ImageVocabulary, vocabulary_matches
from .loading import convert_gguf, load_causal_lm

__all__ = [
    "DENOISE_RATES",
    "FEWSHOT_METHODS",
    "IMAGE_TASKS",
    "IMAGE_TOKEN_MODES",
    "LABEL_KINDS",
    "NONSENSE_LABELS",
    "SHARING_STRATEGIES",
    "TREE_MAX_TOKENS",
    "Episode",
    "EpisodePrompt",
    "EpisodeRecord",
    "FewShotResult",
    "FrozenLM",
    "GenerationStep",
    "ImageVocabulary",
    "ProgressiveResult",
    "build_episode_prompt",
    "convert_gguf",
    "corrupt_ids",
    "denoise",
    "denoising_rates",
    "evaluate_fewshot",
    "flip_images",
    "generate_progressive",
    "generation_steps",
    "image_to_image",
    "load_causal_lm",
    "mask_images",
    "sample_episodes",
    "shift_images",
    "task_induction_text",
    "task_pairs",
    "vocabulary_matches",
    "wilson_interval",
]
