"""Files written by an earlier version of the code load with the numbers they gave then.

tests/fixtures/files_format_1/ was written by the code as it stood before its modules moved into folders
(checkpoint format 1, search index format 1): `last.pt`, a VoP with `pos` and `fn` on the tiny CLIP, its prompts
drawn with std 0.5 so that a misplaced one shows; `videos.index`, search.py's index of the three clips in
`videos/`, made with that model; `expected.pt`, what that code computed: the model's embeddings of the frames
and captions below, and the index's rows.
"""
import shutil
from pathlib import Path

import numpy as np
import torch

import evaluate as ev
import search
from formats.video_index import VideoIndex

FIXTURES = Path(__file__).parent / "fixtures"
FOLDER = FIXTURES / "files_format_1"
EXPECTED = torch.load(FOLDER / "expected.pt")


def format_1_model():
    return ev.load_model_from_checkpoint(FOLDER / "last.pt", clip=FIXTURES / "tiny_clip_openai_jit.pt")


def frames_and_tokens():
    """The inputs expected.pt was computed on: 3 videos of 4 random frames, 3 captions of the tiny CLIP's ids."""
    frames = torch.randn(3, 4, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # (B, F, 3, R, R)
    tokens = torch.zeros(3, 69, dtype=torch.long)  # (B, 77 - P)
    for row, length in enumerate((4, 7, 12)):
        tokens[row, 0], tokens[row, length - 1] = 998, 999  # SOT, EOT
        tokens[row, 1:length - 1] = torch.arange(10, 8 + length)
    return frames, tokens


def test_a_format_1_checkpoint_gives_the_embeddings_it_gave():
    model, checkpoint = format_1_model()
    assert checkpoint["step"] == 3 and model.video_prompts == ("pos", "fn")
    with torch.no_grad():
        video_embeddings, text_embeddings = model(*frames_and_tokens())
    assert torch.equal(video_embeddings, EXPECTED["video_embeddings"])
    assert torch.equal(text_embeddings, EXPECTED["text_embeddings"])


def test_a_format_1_search_index_opens_with_its_model_and_holds_its_rows(tmp_path):
    for name in ("videos.index", "videos.index.f15cd3ef.f16"):
        shutil.copy(FOLDER / name, tmp_path / name)
    model, _ = format_1_model()
    searcher = search.VideoSearch(model, tmp_path / "videos.index", num_workers=0, show_progress=False)  # same model
    index = VideoIndex(tmp_path / "videos.index")
    assert len(index) == 3 and [Path(index.video_path(row)).name for row in range(3)] == [
        "clip0.avi", "clip1.avi", "clip2.avi"]
    rows = torch.from_numpy(np.array(index.embeddings, dtype=np.float32))  # (3, E) as stored, float16
    assert torch.equal(rows, EXPECTED["index_embeddings"])
    again = searcher.embed_videos(sorted((FOLDER / "videos").iterdir()))  # (3, E) float32, this code's
    torch.testing.assert_close(again, rows, atol=1e-3, rtol=0)  # float16 rounding of unit vectors
