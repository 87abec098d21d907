"""A tiny training run whose batch source blocks for good on one process at one step: what the
watchdog tests run (`python -m tests.hang_run WORKDIR TIMEOUT HANG_PROCESS HANG_AT [PORT N I]`).

HANG_PROCESS: the process whose source blocks (-1: none); HANG_AT: the batch position it blocks
at, after writing the time to WORKDIR.hang. With PORT, N and I the process joins an N-process job on 127.0.0.1:PORT as process I.
"""

import logging
import pathlib
import sys
import threading
import time

import jax
import numpy as np
from lm import parallel
from lm.bench.common import random_batch
from lm.models import transformer as T
from lm.train import IndexedBatches, OptimizerConfig, TrainConfig, create_trainer, train_loop

CONFIG = T.preset("llama", **T.TINY, num_kv_heads=2)
ROWS, LENGTH = 4, 16


def blocking_batch_source(position: int, hang_marker=None) -> dict[str, np.ndarray]:
    """This process's rows of the batch at `position`. With `hang_marker` (a path) it writes the
    time there and blocks for good."""
    if hang_marker is not None:
        pathlib.Path(hang_marker).write_text(str(time.time()))
        threading.Event().wait()  # a reader stuck on a dead mount, say
    return random_batch(CONFIG.vocab_size, ROWS, LENGTH, seed=position % 2)


def main(workdir, timeout, hang_process, hang_at, port=None, count=1, index=0):
    config = parallel.ParallelConfig()
    if port is not None:
        config = parallel.ParallelConfig(
            coordinator_address=f"127.0.0.1:{port}", num_processes=int(count), process_id=int(index)
        )
    parallel.initialize_distributed(config)
    trainer = create_trainer(
        CONFIG, T.build_model(CONFIG), OptimizerConfig(learning_rate=1e-2), 100, config
    )
    me = jax.process_index()
    marker = f"{workdir}.hang"
    batches = IndexedBatches(
        lambda i: blocking_batch_source(
            i, marker if me == int(hang_process) and i == int(hang_at) else None
        )
    )
    train_config = TrainConfig(
        steps=50, log_every=2, checkpoint_every=100, progress=False, step_timeout_s=float(timeout)
    )
    train_loop(trainer, train_config, workdir, batches)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, force=True)  # over absl's handler, at WARNING here
    main(*sys.argv[1:])
