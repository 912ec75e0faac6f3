"""BitNet b1.58 transformers (the 2B4T family) as frozen state encoders: model, checkpoints, encoders, compile glue.

    model.py        BitNetConfig, BitLinear, BitNetModel, BitNetForCausalLM (Hugging Face's layout), set_quantized
    checkpoint.py   Hugging Face-layout checkpoints: load_bitnet, save_bitnet (bf16/f32 or the packed 2B4T form),
                    the memory a load needs (check_memory, refused before loading)
    backbone.py     state encoders, BitNetBackbone and its checkpoints, stock_backbone (a stock checkpoint as an
                    encoder), backbone_policy (compile), FrozenBitNet (train)

This package uses only the floor (quant, layouts, loaded) and the runtime; see docs/bitnet.md.
"""

from bitrl_compile.bitnet.backbone import (
    BitNetBackbone,
    EncoderSpec,
    FrozenBitNet,
    backbone_policy,
    load_backbone,
    new_backbone,
    parameter_count,
    save_backbone,
    save_backbone_reference,
    stock_backbone,
)
from bitrl_compile.bitnet.checkpoint import (
    CheckpointTooLarge,
    check_memory,
    checkpoint_files,
    expected_shapes,
    load_bitnet,
    memory_needed,
    read_config,
    save_bitnet,
)
from bitrl_compile.bitnet.model import BitLinear, BitNetConfig, BitNetForCausalLM, BitNetModel, set_quantized

__all__ = ["BitLinear", "BitNetBackbone", "BitNetConfig", "BitNetForCausalLM", "BitNetModel", "CheckpointTooLarge",
           "EncoderSpec", "FrozenBitNet", "backbone_policy", "check_memory", "checkpoint_files", "expected_shapes",
           "load_backbone", "load_bitnet", "memory_needed", "new_backbone", "parameter_count", "read_config",
           "save_backbone", "save_backbone_reference", "save_bitnet", "set_quantized", "stock_backbone"]
