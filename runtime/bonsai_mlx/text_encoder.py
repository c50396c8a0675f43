"""The Qwen3 prompt encoder of Klein: tokenizer (tokenizers + jinja2, no transformers/torch) and mlx-lm's Qwen3.

Replicates diffusers `Flux2KleinPipeline._get_qwen3_prompt_embeds`: chat template (enable_thinking=False,
add_generation_prompt=True), padding to max_sequence_length with the pad token, truncation, a forward pass with
the attention mask, and the hidden states of `out_layers` stacked to (B, L, n·hidden). Hidden states follow HF's
`output_hidden_states=True`: index 0 is the embedding output, index i the output of layer i, and the entry at
index == the original layer count is the final-RMSNorm'ed output.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models import qwen3

from .cpu_layers import use_dense_kernels
from .loading import BundleError, apply_quantization, load_into, load_weights, read_json, to_dtype
from .staging import staged

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class PromptTruncatedWarning(UserWarning):
    """The prompt's chat-templated tokens exceed max_sequence_length and were cut."""


@dataclass(frozen=True)
class TokenizedPrompts:
    """input_ids and attention_mask (B, max_length) int32, and which prompts were truncated."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    truncated: list[bool]


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _compile_template(source: str):
    """A jinja2 environment configured as transformers' chat-template renderer (sandboxed, trim/lstrip blocks)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers tracks it for training masks)."""

        tags = {"generation"}

        def parse(self, parser):  # type: ignore[no-untyped-def]
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class PromptTokenizer:
    """The bundle's `tokenizer/` folder (tokenizer.json, tokenizer_config.json, chat_template.jinja) without torch."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        directory = Path(directory)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise BundleError(f"{tokenizer_file}: missing")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        config_path = directory / "tokenizer_config.json"
        self.config = read_json(config_path) if config_path.is_file() else {}
        self.padding_side = self.config.get("padding_side", "right")
        self.truncation_side = self.config.get("truncation_side", "right")
        self.special_tokens = {
            key: token for key in SPECIAL_TOKEN_KEYS if (token := _token_content(self.config.get(key))) is not None
        }
        pad_token = self.special_tokens.get("pad_token")
        if pad_token is None or self.tokenizer.token_to_id(pad_token) is None:
            raise BundleError(f"{config_path}: no usable pad_token")
        self.pad_token = pad_token
        self.pad_id = int(self.tokenizer.token_to_id(pad_token))
        template = self._chat_template(directory)
        self.template = _compile_template(template)

    def _chat_template(self, directory: Path) -> str:
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates
            template = {entry.get("name"): entry.get("template") for entry in template}.get("default")
        if not isinstance(template, str):
            raise BundleError(f"{directory}: no chat template (chat_template.jinja or tokenizer_config.json)")
        return template

    def apply_chat_template(self, prompt: str) -> str:
        """The user message rendered as diffusers does: add_generation_prompt=True, enable_thinking=False."""
        messages = [{"role": "user", "content": prompt}]
        return self.template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=True,
            enable_thinking=False,
            **self.special_tokens,
        )

    def __call__(self, prompts: Sequence[str], max_length: int) -> TokenizedPrompts:
        """Chat-template, tokenize, truncate and pad every prompt to exactly `max_length` tokens."""
        texts = [self.apply_chat_template(p) for p in prompts]
        tokenizer = self.tokenizer
        tokenizer.enable_truncation(max_length, stride=0, strategy="longest_first", direction=self.truncation_side)
        tokenizer.enable_padding(
            direction=self.padding_side, pad_id=self.pad_id, pad_type_id=0, pad_token=self.pad_token, length=max_length
        )
        encodings = tokenizer.encode_batch(texts)
        truncated = [bool(e.overflowing) for e in encodings]
        for prompt, cut in zip(prompts, truncated, strict=True):
            if cut:
                warnings.warn(
                    f"prompt truncated to {max_length} tokens (chat template included): {prompt[:60]!r}...",
                    PromptTruncatedWarning,
                    stacklevel=2,
                )
        return TokenizedPrompts(
            input_ids=np.array([e.ids for e in encodings], dtype=np.int32),
            attention_mask=np.array([e.attention_mask for e in encodings], dtype=np.int32),
            truncated=truncated,
        )


def attention_mask_4d(attention_mask: np.ndarray) -> mx.array:
    """Boolean (B, 1, L, L) mask, True = may attend: causal, with padded keys removed (as HF builds it). A query
    row left with no key (left padding) keeps its causal keys instead of producing NaNs."""
    length = attention_mask.shape[1]
    causal = np.tril(np.ones((length, length), dtype=bool))
    allowed = causal[None] & attention_mask.astype(bool)[:, None, :]
    empty = ~allowed.any(axis=-1)
    allowed = np.where(empty[..., None], causal[None], allowed)
    return mx.array(allowed[:, None])


class Qwen3Encoder:
    """mlx-lm's Qwen3 (layers up to the last one needed), returning stacked hidden states."""

    def __init__(self, model: qwen3.Model, original_num_layers: int):
        self.model = model
        self.original_num_layers = original_num_layers

    def hidden_states(self, input_ids: np.ndarray, attention_mask: np.ndarray, layers: Sequence[int]) -> mx.array:
        """(B, L, len(layers)·hidden): HF hidden_states[k] for k in layers, concatenated per token."""
        inner = self.model.model
        available = len(inner.layers)
        wanted = set(layers)
        if max(layers) > available or min(layers) < 0:
            raise BundleError(f"text encoder has {available} layers; cannot return hidden states {list(layers)}")
        if self.original_num_layers in wanted and available != self.original_num_layers:
            raise BundleError("the final-norm hidden state needs every layer of the original text encoder")
        h = inner.embed_tokens(mx.array(input_ids))
        mask = attention_mask_4d(attention_mask)
        states: dict[int, mx.array] = {0: h} if 0 in wanted else {}
        for index, layer in enumerate(inner.layers[: max(layers)], start=1):
            h = staged(layer(h, mask))  # one layer's dequantized weights live at a time (bonsai_mlx.staging)
            if index in wanted:
                states[index] = inner.norm(h) if index == self.original_num_layers else h
        return mx.concatenate([states[k] for k in layers], axis=-1)


def load_text_encoder(
    directory: str | Path, original_num_layers: int | None = None, dtype: str | mx.Dtype = "float32"
) -> Qwen3Encoder:
    """Qwen3 from a bundle's `text_encoder/` (HF config + optional mlx-lm "quantization"; lm_head is dropped)."""
    directory = Path(directory)
    config = read_json(directory / "config.json")
    weights = {k: v for k, v in load_weights(directory).items() if not k.startswith("lm_head.")}
    args = qwen3.ModelArgs.from_dict({**config, "model_type": "qwen3", "tie_word_embeddings": True})
    model = qwen3.Model(args)
    apply_quantization(model, config.get("quantization"), weights)
    load_into(model, weights, to_dtype(dtype), directory)
    use_dense_kernels(model)
    return Qwen3Encoder(model, original_num_layers or args.num_hidden_layers)
