"""Adapter and checkpoint formats other tools read: kohya LoRA files, original (LDM) single-file SDXL.

`sdxl_unet_layout` maps diffusers' UNet module names to the original SDXL UNet's (`input_blocks`,
`middle_block`, `output_blocks`); both `kohya` and `sdxl_single_file` are built on it.
"""
