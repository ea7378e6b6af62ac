"""One rank-aware logger: the main process logs at the configured level, the others only warnings.

At DEBUG every process logs, each line tagged with its rank (for debugging distributed runs).
"""
from __future__ import annotations

import logging
import os


def get_logger(name: str = "meddiff") -> logging.Logger:
    return logging.getLogger(name)


def setup_logging(level: str = "INFO", is_main_process: bool = True) -> logging.Logger:
    logger = get_logger()
    logger.handlers.clear()
    handler = logging.StreamHandler()
    rank = os.environ.get("RANK", "0")
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if is_main_process or level == "DEBUG" else "WARNING")
    logger.propagate = False
    return logger
