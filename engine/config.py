"""Model hyperparameters as one dataclass tree.

The JSON form is the schema of ``shared/golden/*/model/config.json``: sections ``llm``, ``flow`` and
``hift`` whose field names are the upstream constructor argument names, nested the way
``cosyvoice2.yaml`` nests them. Defaults are the real CosyVoice2-0.5B values, so an official model
directory without ``config.json`` loads with ``ModelConfig()``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints


@dataclass
class Qwen2Config:
    pretrain_path: str = "CosyVoice-BlankEN"
    hidden_size: int = 896
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 4864
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    vocab_size: int = 151936
    max_position_embeddings: int = 32768
    sliding_window: int = 32768
    use_sliding_window: bool = False
    max_window_layers: int = 24
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151643
    endofprompt_token_id: int = 151646


@dataclass
class SamplingConfig:
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1


@dataclass
class LLMConfig:
    llm_input_size: int = 896
    llm_output_size: int = 896
    speech_token_size: int = 6561
    length_normalized_loss: bool = True
    lsm_weight: float = 0
    mix_ratio: list[int] = field(default_factory=lambda: [5, 15])
    llm: Qwen2Config = field(default_factory=Qwen2Config)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    # Derived ids (not in the JSON): rows of speech_embedding / classes of llm_decoder.
    @property
    def eos_token(self) -> int:
        return self.speech_token_size

    @property
    def fill_token(self) -> int:
        return self.speech_token_size + 2

    @property
    def num_speech_classes(self) -> int:
        return self.speech_token_size + 3


@dataclass
class EncoderConfig:
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    dropout_rate: float = 0.1
    positional_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    normalize_before: bool = True
    input_layer: str = "linear"
    pos_enc_layer_type: str = "rel_pos_espnet"
    selfattention_layer_type: str = "rel_selfattn"
    input_size: int = 512
    use_cnn_module: bool = False
    macaron_style: bool = False
    static_chunk_size: int = 25


@dataclass
class CFMParams:
    sigma_min: float = 1e-6
    solver: str = "euler"
    t_scheduler: str = "cosine"
    training_cfg_rate: float = 0.2
    inference_cfg_rate: float = 0.7
    reg_loss_type: str = "l1"


@dataclass
class EstimatorConfig:
    in_channels: int = 320
    out_channels: int = 80
    channels: list[int] = field(default_factory=lambda: [256])
    dropout: float = 0.0
    attention_head_dim: int = 64
    n_blocks: int = 4
    num_mid_blocks: int = 12
    num_heads: int = 8
    act_fn: str = "gelu"
    static_chunk_size: int = 50
    num_decoding_left_chunks: int = -1


@dataclass
class DecoderConfig:
    in_channels: int = 240
    n_spks: int = 1
    spk_emb_dim: int = 80
    cfm_params: CFMParams = field(default_factory=CFMParams)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)


@dataclass
class FlowConfig:
    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    output_type: str = "mel"
    vocab_size: int = 6561
    input_frame_rate: int = 25
    only_mask_loss: bool = True
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class IstftParams:
    n_fft: int = 16
    hop_len: int = 4


@dataclass
class F0PredictorConfig:
    num_class: int = 1
    in_channels: int = 80
    cond_channels: int = 512


@dataclass
class HiFTConfig:
    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10
    upsample_rates: list[int] = field(default_factory=lambda: [8, 5, 3])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [16, 11, 7])
    istft_params: IstftParams = field(default_factory=IstftParams)
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5]] * 3)
    source_resblock_kernel_sizes: list[int] = field(default_factory=lambda: [7, 7, 11])
    source_resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5]] * 3)
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_predictor: F0PredictorConfig = field(default_factory=F0PredictorConfig)

    @property
    def samples_per_frame(self) -> int:
        """Output samples per mel frame (480 for 24 kHz)."""
        n = self.istft_params.hop_len
        for r in self.upsample_rates:
            n *= r
        return n


@dataclass
class ModelConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    hift: HiFTConfig = field(default_factory=HiFTConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, d, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def tiny(cls) -> "ModelConfig":
        """The tiny test model of the golden sets (``tiny-s1``): same classes, small widths."""
        c = cls()
        c.llm.llm_input_size = c.llm.llm_output_size = 128
        c.llm.llm = Qwen2Config(pretrain_path="tiny-random", hidden_size=128, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                intermediate_size=256, vocab_size=512, max_window_layers=2,
                                bos_token_id=None, eos_token_id=None, endofprompt_token_id=511)
        c.flow.input_size = 32
        c.flow.encoder = EncoderConfig(output_size=32, attention_heads=2, linear_units=64, num_blocks=2,
                                       input_size=32)
        c.flow.decoder.estimator = EstimatorConfig(channels=[32], attention_head_dim=16, n_blocks=1,
                                                   num_mid_blocks=2, num_heads=2)
        c.hift.base_channels = 32
        c.hift.f0_predictor = F0PredictorConfig(cond_channels=32)
        return c


def _from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"config section {where or '<root>'} must be an object, got {type(d).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} in section {where or '<root>'}")
    kwargs = {}
    for name, value in d.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            value = _from_dict(typ, value, f"{where}.{name}" if where else name)
        kwargs[name] = value
    return cls(**kwargs)
