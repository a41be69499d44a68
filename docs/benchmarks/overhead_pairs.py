"""Interleaved pipeline / bare-forward timings of the shipped one-step student (BENCHMARKS.md "Inference at the floor"):
prints the median pipeline overhead per batch size as JSON."""
import time, torch, statistics, json
torch.set_num_threads(2)
from stepdistill import StepDistillPipeline
p = StepDistillPipeline.from_pretrained("builtin:animal_mnist_dmd2")
den = p.denoiser()
out = {}
for b in (1, 8, 32):
    labels = [i % 10 for i in range(b)]
    x = torch.randn(b, 1, 32, 32); tt = torch.full((b,), 999.); y = torch.tensor(labels)
    def bare():
        with torch.no_grad(): den._call(x, tt, y)
    def pipe(): p(class_labels=labels, seed=0, output_type="pt")
    for _ in range(5): bare(); pipe()
    rb, rp = [], []
    n = 60 if b < 32 else 20
    for _ in range(n):  # interleaved: both see the same load
        t0 = time.perf_counter(); bare(); rb.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); pipe(); rp.append(time.perf_counter() - t0)
    out[b] = {"bare_ms": statistics.median(rb) * 1e3, "pipeline_ms": statistics.median(rp) * 1e3,
              "overhead": statistics.median(rp) / statistics.median(rb), "pairs": n}
print(json.dumps(out, indent=1))
