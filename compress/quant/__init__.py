"""pocketfusion.compress.quant — weight quantization of the U-Net (transitional: being split by concern)."""
