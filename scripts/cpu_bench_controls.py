"""`flashsdpa bench --device cpu` with its flashsdpa peer replaced by a control, to read the bench's own floor.

The bench times its peers interleaved in one process; a control in flashsdpa's place says what a ratio is
made of. `torch`: torch's SDPA against itself (the bench's noise and any bias of its ordering); `op`: torch's
CPU flash kernel called from Python as the aten op (what calling the kernel from Python costs); `stand-in`:
the op behind four checks (the least Python a library can put before it). The rest of the command line goes
to `flashsdpa bench` (default: the quick matrix's L=1024 rows, FlexAttention off).

    PYTHONPATH=src python scripts/cpu_bench_controls.py {torch,op,stand-in} [--out DIR] [bench options]
"""

import sys

import torch.nn.functional as F

from flashsdpa.backends import aten
from flashsdpa.bench import peers
from flashsdpa.cli import main as cli_main

from cpu_alternation import stand_in  # (scripts/ is on the path when a script there runs)


def control(name: str):
    kernel = aten.KERNELS[0]

    def prepare(self, case, device):
        if name == "torch":
            return lambda inputs: F.scaled_dot_product_attention(inputs.query, inputs.key, inputs.value,
                                                                 is_causal=case.causal)  # fmt: skip
        if name == "op":
            return lambda inputs: kernel(inputs.query, inputs.key, inputs.value, 0.0, case.causal)[0]
        return lambda inputs: stand_in(inputs.query, inputs.key, inputs.value, case.causal)

    return prepare


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in ("torch", "op", "stand-in"):
        sys.exit(__doc__)
    peers.FlashSdpaPeer.prepare = control(sys.argv[1])
    rest = sys.argv[2:]
    defaults = [] if "--cases" in rest else ["--quick", "--cases", "cpu/*-L1024*"]
    defaults += [] if "--flex" in rest else ["--flex", "off"]
    return cli_main(["bench", "--device", "cpu", *defaults, *rest])


if __name__ == "__main__":
    sys.exit(main())
