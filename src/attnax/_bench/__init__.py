"""``attnax bench``: time every backend over sequence lengths and masks on the current device.

The sweep is backends x sequence lengths x cases, where a case is full attention, causal
attention or ALiBi + causal (a score mod). Each cell is timed as the median of ``--repeats``
calls of a jitted function after one warm-up call (compilation is not timed), with
``block_until_ready`` around every call and fresh random inputs for each (length, case).

Throughput follows the FlashAttention convention: a forward pass counts ``4 B H S^2 D``
floating-point operations, half of that under a causal mask, and forward + backward counts
3.5 times the forward. Linear and lite attention are charged the same softmax-equivalent count,
so their TFLOP/s compare wall time against the softmax backends, not the hardware's work.

The error column is ``max |out - reference|`` where the reference is :func:`standard_attention`
on the same inputs, upcast to float32, at ``precision=HIGHEST`` (forward output only, also
with ``--backward``). Linear and lite attention compute other functions, so they show "-".

The CLI uses attnax's public API only.
"""

from .config import BenchRow as BenchRow
from .config import add_bench_arguments as add_bench_arguments
from .run import run_bench as run_bench

__all__ = ["BenchRow", "add_bench_arguments", "run_bench"]
