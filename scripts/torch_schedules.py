#!/usr/bin/env python3
"""Schedule interchange between Baton and PyTorch's torch.distributed.pipelining.

Run through scripts/torch-schedules.sh (which sets up the venv and builds Baton); by hand:

    torch_schedules.py dump OUT_DIR
        Builds ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble and ScheduleZBVZeroBubble
        for 2 and 4 ranks (8 micro-batches, 2 parts per rank) and writes, for each, PyTorch's
        compute-only dump and its lowered (compute_comms) dump:
        OUT_DIR/<name>_p<P>_m8_v2.compute.csv and .comms.csv.

    torch_schedules.py check-baton BATON_BIN WORK_DIR
        Exports every Baton generator (p = 2 and 4, m = 8) as a compute-only CSV and as a
        --comms CSV with BATON_BIN, loads the --comms file with
        _PipelineScheduleRuntime._load_csv(format="compute_comms") and the compute-only one with
        format="compute_only", runs PyTorch's own comms simulator (_simulate_comms_compute) on
        the loaded --comms schedule, and compares Baton's --comms file with what PyTorch lowers
        Baton's compute-only file to. Exits non-zero if PyTorch refuses any file.

No process group is created: the schedules only read a stage's index, the number of stages, the
group size and rank, and `submod`, so plain stand-in objects serve as stages.
"""

import csv
import os
import subprocess
import sys

import torch
from torch.distributed.pipelining import schedules as S

MICROBATCHES = 8
CHUNKS = 2
RANKS = (2, 4)

# (file name, class, PyTorch's placement of parts on ranks: "loop" or "v")
TORCH_SCHEDULES = (
    ("interleaved-1f1b", S.ScheduleInterleaved1F1B, "loop"),
    ("interleaved-zb", S.ScheduleInterleavedZeroBubble, "loop"),
    ("zbv", S.ScheduleZBVZeroBubble, "v"),
)

# Baton's generators: (name, chunks, placement)
BATON_SCHEDULES = (
    ("gpipe", 1, "loop"),
    ("1f1b", 1, "loop"),
    ("interleaved", 2, "loop"),
    ("zb-h1", 1, "loop"),
    ("zb-v", 2, "v"),
)

# Housekeeping actions PyTorch's _simulate_comms_compute does not model.
HOUSEKEEPING = {
    S._ComputationType.UNSHARD,
    S._ComputationType.RESHARD,
    S._ComputationType.REDUCE_GRAD,
    S._ComputationType.WAIT_REDUCE_GRAD,
}


class StandInStage:
    """What a schedule reads from a pipeline stage when it only builds its order."""

    def __init__(self, stage_index, num_stages, group_size, group_rank):
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.group_size = group_size
        self.group_rank = group_rank
        self.is_first = stage_index == 0
        self.is_last = stage_index == num_stages - 1
        self.submod = None
        self.stage_index_to_group_rank = {}


def parts_of_rank(rank, ranks, chunks, style):
    if style == "v":
        assert chunks == 2
        return [rank, 2 * ranks - 1 - rank]
    return [c * ranks + rank for c in range(chunks)]


def stand_in_stages(ranks, chunks, style, rank=0):
    total = ranks * chunks
    return [StandInStage(i, total, ranks, rank) for i in parts_of_rank(rank, ranks, chunks, style)]


def loss_fn(output, target):
    return output


def dump(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    for name, cls, style in TORCH_SCHEDULES:
        for ranks in RANKS:
            sched = cls(stand_in_stages(ranks, CHUNKS, style), MICROBATCHES, loss_fn=loss_fn)
            stem = os.path.join(out_dir, f"{name}_p{ranks}_m{MICROBATCHES}_v{CHUNKS}")
            sched._dump_csv(stem + ".compute.csv", format="compute_only")
            sched._dump_csv(stem + ".comms.csv", format="compute_comms")
            print(f"wrote {stem}.compute.csv and .comms.csv ({cls.__name__})")


def read_rows(path):
    with open(path, newline="") as f:
        return [[S._Action.from_str(cell) for cell in row] for row in csv.reader(f)]


def check_baton(baton, work_dir):
    os.makedirs(work_dir, exist_ok=True)
    refused = 0
    for kind, chunks, style in BATON_SCHEDULES:
        for ranks in RANKS:
            stem = os.path.join(work_dir, f"{kind}_p{ranks}_m{MICROBATCHES}_v{chunks}")
            base = [baton, "schedule", "--schedule", kind, "--stages", str(ranks),
                    "--microbatches", str(MICROBATCHES), "--chunks", str(chunks), "--format", "csv"]
            subprocess.run(base + ["--out", stem + ".compute.csv"], check=True)
            subprocess.run(base + ["--comms", "--out", stem + ".comms.csv"], check=True)
            label = f"{kind:12} p={ranks} m={MICROBATCHES} v={chunks}"
            try:
                comms = S._PipelineScheduleRuntime(
                    stand_in_stages(ranks, chunks, style), MICROBATCHES, loss_fn=loss_fn)
                comms._load_csv(stem + ".comms.csv", format="compute_comms")
            except Exception as e:  # PyTorch raises AssertionError, ValueError or RuntimeError
                refused += 1
                print(f"{label}: compute_comms REFUSED: {type(e).__name__}: {e}")
                continue
            loaded = comms.pipeline_order_with_comms
            bare = {r: [a for a in row if a.computation_type not in HOUSEKEEPING] for r, row in loaded.items()}
            try:
                S._simulate_comms_compute(bare, lambda s: comms.stage_index_to_group_rank[s], ranks * chunks)
                simulated = "simulates without a stall"
            except Exception as e:
                refused += 1
                simulated = f"SIMULATION FAILED: {e}"
            try:
                compute = S._PipelineScheduleRuntime(
                    stand_in_stages(ranks, chunks, style), MICROBATCHES, loss_fn=loss_fn)
                compute._load_csv(stem + ".compute.csv", format="compute_only")
            except Exception as e:
                refused += 1
                print(f"{label}: compute_comms accepted, {simulated}; compute_only REFUSED: {e}")
                continue
            ours = [[str(a) for a in loaded[r]] for r in sorted(loaded)]
            theirs = [[str(a) for a in compute.pipeline_order_with_comms[r]]
                      for r in sorted(compute.pipeline_order_with_comms)]
            same = "identical to" if ours == theirs else "DIFFERENT from"
            print(f"{label}: compute_comms accepted, {simulated}; compute_only accepted; "
                  f"Baton's --comms file is {same} PyTorch's lowering of Baton's compute-only file")
    print(f"torch {torch.__version__}: {refused} refusal(s)")
    return 1 if refused else 0


def main(argv):
    if torch.__version__.split("+")[0] != "2.15.0":
        print(f"warning: torch {torch.__version__}, the goldens are from 2.15.0", file=sys.stderr)
    if len(argv) == 3 and argv[1] == "dump":
        dump(argv[2])
        return 0
    if len(argv) == 4 and argv[1] == "check-baton":
        return check_baton(argv[2], argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
