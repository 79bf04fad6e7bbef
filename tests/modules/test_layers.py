"""A compressed twin keeps the behaviour of the module it replaces, in every model family (issue 13, item 15).

For each family a tiny random model is compressed (8-bit per channel, every Linear, Embedding and Conv2d the
defaults do not keep dense). The reference is the *same* dense model with each compressed weight replaced by
its decoded value: the compressed model must compute exactly what that model computes, so a subclass's extra
behaviour (Gemma's embedding scale, BART's position offset, "same" padding, weight standardisation, routers) is
kept or the test fails. Each model is also saved and reloaded with plain ``from_pretrained``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from torch import nn

import hfcompress
from hfcompress import HfCompressConfig, compressed_modules
from hfcompress.modules import compressed_twin
from hfcompress.spec import LayerSpec

TEXT = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
LM = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip


def _families():
    yield "llama", lambda: T.LlamaForCausalLM(T.LlamaConfig(**LM)), "text"
    yield "mistral", lambda: T.MistralForCausalLM(T.MistralConfig(**LM)), "text"
    yield "qwen2", lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**LM)), "text"
    yield "qwen3", lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**LM, head_dim=16)), "text"
    yield "phi3", lambda: T.Phi3ForCausalLM(T.Phi3Config(**LM, pad_token_id=0)), "text"
    yield "gemma2", lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**LM, head_dim=16)), "text"
    yield "gemma3", lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**LM, head_dim=16, sliding_window=8)), "text"
    yield "bart", lambda: T.BartForCausalLM(T.BartConfig(vocab_size=256, d_model=64, decoder_layers=2, decoder_attention_heads=4,
                                                        decoder_ffn_dim=96, max_position_embeddings=64, scale_embedding=True, tie_word_embeddings=False)), "text"  # fmt: skip
    yield "bert", lambda: T.BertModel(T.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=96, max_position_embeddings=64)), "text"  # fmt: skip
    yield "vit", lambda: T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2,
                                                                  num_attention_heads=4, intermediate_size=96, num_labels=5)), "image"  # fmt: skip
    yield "resnet", lambda: T.ResNetForImageClassification(T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                                                         layer_type="basic", num_labels=5)), "image"  # fmt: skip
    yield "convnext", lambda: T.ConvNextForImageClassification(T.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5)), "image"
    yield "bit", lambda: T.BitForImageClassification(T.BitConfig(embedding_size=32, hidden_sizes=[64, 128], depths=[1, 1], num_groups=8,
                                                                 layer_type="bottleneck", num_labels=5)), "image"  # fmt: skip


FAMILIES = list(_families())


def _output(model, kind):
    with torch.no_grad():
        out = model(input_ids=TEXT) if kind == "text" else model(pixel_values=IMAGES)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name, build, kind", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_compressed_model_computes_what_its_decoded_dense_twin_computes(name, build, kind, tmp_path):
    torch.manual_seed(0)
    dense = build().eval()
    config = HfCompressConfig(bits=8, group_size=None, targets=["Linear", "Embedding", "Conv2d"])
    model = hfcompress.compress(copy.deepcopy(dense), config)
    hfcompress.set_inference_path(model, "reference")  # the decode-then-compute arithmetic of the dense modules
    twins = compressed_modules(model)
    assert twins, name
    reference = copy.deepcopy(dense)
    for module_name, twin in twins.items():
        module = reference.get_submodule(module_name)
        assert isinstance(twin, type(module)) or type(module) in (nn.Linear, nn.Conv2d, nn.Embedding), module_name
        module.weight.data = twin.dequantize_weight(module.weight.dtype).reshape(module.weight.shape)
    torch.testing.assert_close(_output(model, kind), _output(reference, kind), rtol=0, atol=0)
    model.save_pretrained(tmp_path / name)
    reloaded = type(dense).from_pretrained(tmp_path / name).eval()
    hfcompress.set_inference_path(reloaded, "reference")
    torch.testing.assert_close(_output(reloaded, kind), _output(model, kind), rtol=0, atol=0)


def test_subclass_twins_keep_their_class_state_and_forward():
    emb = T.models.gemma3.modeling_gemma3.Gemma3TextScaledWordEmbedding(50, 16, 0, embed_scale=4.0)
    twin = compressed_twin(emb, LayerSpec(bits=8, group_size=None))
    twin.compress_(emb.weight)
    assert isinstance(twin, type(emb)) and twin.scalar_embed_scale == 4.0 and float(twin.embed_scale) == 4.0
    ids = torch.tensor([[1, 2, 3]])
    dense = copy.deepcopy(emb)
    dense.weight.data = twin.dequantize_weight(torch.float32)
    assert torch.equal(twin(ids), dense(ids))  # the scale is applied, as in the original
    assert "embed_scale" not in twin.state_dict()  # non-persistent, as in the original


class SamePadConv(nn.Conv2d):
    """A Conv2d subclass from outside transformers that pads "same" in its own forward (timm-style)."""

    def forward(self, x):
        pad = self.kernel_size[0] // 2
        return self._conv_forward(nn.functional.pad(x, (pad, pad, pad, pad)), self.weight, self.bias)


class Scaled(nn.Linear):
    def __init__(self, *args, factor: float = 3.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.factor = factor
        self.extra = nn.Parameter(torch.ones(self.out_features))

    def forward(self, x):
        return super().forward(x) * self.factor * self.extra


def test_subclasses_from_outside_transformers():
    conv = SamePadConv(3, 4, 3, padding=0)
    twin = compressed_twin(conv, LayerSpec(bits=8, group_size=None))
    twin.compress_(conv.weight)
    x = torch.randn(1, 3, 8, 8)
    ref = copy.deepcopy(conv)
    ref.weight.data = twin.dequantize_weight(torch.float32)
    assert twin(x).shape == (1, 4, 8, 8) and torch.equal(twin(x), ref(x))  # the padding is kept
    lin = Scaled(6, 5)
    t2 = compressed_twin(lin, LayerSpec(bits=8, group_size=None))
    t2.compress_(lin.weight)
    assert "extra" in dict(t2.named_parameters()) and t2.factor == 3.0
    ref2 = copy.deepcopy(lin)
    ref2.weight.data = t2.dequantize_weight(torch.float32)
    x2 = torch.randn(2, 6)
    assert torch.equal(t2(x2), ref2(x2))
    assert set(t2.state_dict()) == {"bias", "extra", "weight_packed", "weight_scale", "weight_shape"}


def test_layers_already_quantized_elsewhere_are_refused():
    lin = nn.Linear(4, 4)
    lin.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="not a floating parameter"):
        compressed_twin(lin, LayerSpec(bits=4))
