"""Studies that compare pocketfusion with what a user would pick instead (orchestration: may import any stage).

``benchmarks/*.py`` at the top of the repository are thin drivers of these modules:

* ``pocketfusion.benchmarks.quant`` — W8 / W4 quantization against optimum-quanto, torchao,
  onnxruntime, ai-edge-quantizer and coremltools on one U-Net (``benchmarks/quant.py``);
* ``pocketfusion.benchmarks.peers`` — U-Net latency of the exports against optimum's ONNX and
  PyTorch eager (``benchmarks/peers.py``);
* ``pocketfusion.benchmarks.scale`` — exports of the full-size SD-1.5 U-Net: wall time, peak RAM,
  sizes (``benchmarks/scale.py``);
* ``pocketfusion.benchmarks.latency`` — interleaved latency rounds, shared by the first two;
* ``pocketfusion.benchmarks.single_file`` — a full-size SD-1.5 single-file checkpoint against the same model as a
  diffusers folder: load time and peak RAM (``benchmarks/single_file.py``);
* ``pocketfusion.benchmarks.lora_quant`` — the demo LoRA merged, then W8 / W4: its concept accuracy after each
  (``benchmarks/lora_quant.py``).
"""
