"""normkit in a few lines: a BatchNorm2d trained by plain gradient descent on NumPy arrays.

    python examples/quickstart.py

The layer learns the per-channel scale and shift that map normalized inputs onto a target with
known statistics; its running statistics converge to those of the data, and eval mode uses them.
"""
import numpy as np

import normkit as nk

rng = np.random.default_rng(0)
C = 8
data_mean = rng.uniform(-3, 3, C).astype(np.float32)   # what the running statistics should learn
data_std = rng.uniform(0.5, 2, C).astype(np.float32)
target_scale = rng.uniform(0.5, 1.5, C).astype(np.float32)  # what weight and bias should learn
target_shift = rng.uniform(-1, 1, C).astype(np.float32)

bn = nk.nn.BatchNorm2d(C)
lr = 0.5
for step in range(201):
    x = (rng.standard_normal((16, C, 12, 12), dtype=np.float32) * data_std[:, None, None]
         + data_mean[:, None, None])
    z = (x - data_mean[:, None, None]) / data_std[:, None, None]
    target = z * target_scale[:, None, None] + target_shift[:, None, None]
    y = bn(x)                                    # forward (training: batch statistics)
    loss = 0.5 * np.mean((y - target) ** 2)
    bn.zero_grad()
    bn.backward((y - target) / y.size)           # dx returned; weight.grad, bias.grad accumulated
    for p in bn.parameters():
        p.data -= lr * C * p.grad
    if step % 50 == 0:
        print(f"step {step:3d}  loss {loss:.6f}")

print("running_mean error", float(np.abs(bn.running_mean - data_mean).max()))
print("weight error      ", float(np.abs(bn.weight.data - target_scale).max()))
bn.eval()                                        # eval: the running statistics normalize
x = rng.standard_normal((4, C, 12, 12), dtype=np.float32) * data_std[:, None, None] + data_mean[:, None, None]
print("eval output mean per channel ≈ target shift:",
      np.allclose(bn(x).mean(axis=(0, 2, 3)), target_shift, atol=0.15))
print("state_dict keys:", list(bn.state_dict()))
