"""tuner: LoRA fine-tuning for SDXL and the Qwen-VL family on Ascend NPUs and NVIDIA CUDA."""

__version__ = "0.1.0"
