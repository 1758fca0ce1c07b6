"""What makes a real training run safe, around train.py's loop. Skip on a first reading.

    runs.py          a run's folder and lock, its video checks, saving and resuming, logs
    checkpoints.py   the checkpoint file (only the trainable tensors) and the run folder's lock
    frame_store.py   each video decoded once, its frames kept for later visits (--frame-store)
    figures.py       training curves and retrieval examples (matplotlib and Pillow)
"""
