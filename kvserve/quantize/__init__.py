"""`kvserve quantize`: quantized checkpoints (AWQ and int4 in AutoAWQ's GEMM format, int8 in kvserve's)."""
