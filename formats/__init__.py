"""The files the project reads and writes, one module a format. Skip on a first reading: clip_model.load,
data.build_dataset and search.py call them.

    clip_weights.py   CLIP weights: OpenAI's releases, state dicts, transformers and open_clip folders
    modelscope.py     the authors' released VoP (a ModelScope folder)
    annotations.py    the benchmarks' annotation files (MSR-VTT, DiDeMo, ActivityNet, LSMDC) and CSV
    video_io.py       video files: probing, decoding the frames asked for, writing test clips
    video_index.py    search.py's index of embedded videos
"""
