"""train.py: the loss, the schedule, distributed equivalence, checkpoints, resuming, and a failing run."""
import dataclasses
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from machinery import checkpoints
import data
from utils import distributed
import evaluate
from machinery import runs
import train
from clip_model import CLIP
from utils.errors import UserError
from helpers import SMALL_CLIP, free_port, read_log, small_config
from vop import VoP, VoPConfig

def test_contrastive_loss_by_hand():
    video = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    text = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    logit_scale = torch.tensor(math.log(10.0))
    logits = 10 * text @ video.t()  # rows: texts, columns: videos
    by_hand = (-(logits.diag() - logits.logsumexp(1)).mean() - (logits.diag() - logits.logsumexp(0)).mean()) / 2
    torch.testing.assert_close(train.contrastive_loss(video, text, logit_scale), by_hand)
    assert train.contrastive_loss(video, text, logit_scale) < train.contrastive_loss(video.flip(0), text, logit_scale)


def test_learning_rate_warms_up_then_decays_by_cosine():
    total, peak = 100, 1e-3
    lrs = [train.get_lr(step, total, peak, warmup=0.1) for step in range(total)]
    assert lrs[0] == pytest.approx(peak / 10) and lrs[9] == pytest.approx(peak)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # linear warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then monotone decay
    assert lrs[55] == pytest.approx(peak / 2, rel=0.02) and lrs[-1] < peak * 1e-3


def test_config_flags_come_from_the_dataclass():
    config = train.parse_train_config(["--prompts", "fn,ctx", "--lr", "0.01", "--no-eval-each-epoch", "--epochs",
                                       "3", "--grad-checkpointing"])
    assert (config.prompts, config.lr, config.eval_each_epoch, config.epochs) == ("fn,ctx", 0.01, False, 3)
    assert config.grad_checkpointing and train.parse_train_config([]) == train.TrainConfig()
    assert (config.batch_size, config.num_frames, config.weight_decay, config.grad_clip) == (32, 12, 0.2, 1.0)


# -- distributed: 2 processes (gloo, CPU) against 1 process on the same global batch -----------------------

def _losses_and_gradients(model, frames, tokens):
    video, text = model(frames, tokens)
    loss = train.contrastive_loss(train.gather_with_grad(video), train.gather_with_grad(text), model.logit_scale)
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    train.sum_gradients_across_processes(trainable)
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def _distributed_worker(rank, world_size, port, clip_state, frames, tokens, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    clip = CLIP(SMALL_CLIP)
    clip.load_state_dict(clip_state)
    torch.manual_seed(1)
    model = VoP(clip, VoPConfig("pos,ctx", num_frames=frames.shape[1], fn_layers=1))
    local = slice(rank * 2, rank * 2 + 2)
    loss, gradients = _losses_and_gradients(model, frames[local], tokens[local])
    torch.save({"loss": loss, "gradients": gradients}, f"{out_path}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    torch.manual_seed(0)
    clip = CLIP(SMALL_CLIP)
    frames = torch.randn(4, 3, 3, 32, 32)  # global batch of 4 videos: 2 per process
    tokens = VoP(clip, VoPConfig(num_frames=3)).tokenize(["a red circle moves left", "a blue square moves up",
                                               "a green triangle moves right", "a yellow circle moves down"])
    out_path = tmp_path / "result"
    mp.spawn(_distributed_worker, args=(2, free_port(), clip.state_dict(), frames, tokens, str(out_path)),
             nprocs=2, join=True)

    torch.manual_seed(1)
    single = VoP(clip, VoPConfig("pos,ctx", num_frames=3, fn_layers=1))
    loss, gradients = _losses_and_gradients(single, frames, tokens)
    for rank in range(2):
        result = torch.load(f"{out_path}.{rank}")
        torch.testing.assert_close(result["loss"], loss)
        assert result["gradients"].keys() == gradients.keys()
        for name, gradient in gradients.items():
            torch.testing.assert_close(result["gradients"][name], gradient, atol=1e-6, rtol=1e-4, msg=name)


def _test_sets(world):
    """The small world's 8 test pairs, and a 2-video part of it: fewer videos and captions than 3 processes."""
    test_set = data.build_dataset("synthetic", world, "test", num_frames=4, image_size=32)
    return test_set, test_set.without_videos(range(2, 8))


def _embedding_worker(rank, world_size, port, clip_state, world, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    clip = CLIP(SMALL_CLIP)
    clip.load_state_dict(clip_state)
    torch.manual_seed(1)
    model = VoP(clip, VoPConfig("pos", num_frames=4))
    embeddings = [evaluate.embed(model, test_set, batch_size=3, num_workers=0) for test_set in _test_sets(world)]
    torch.save(embeddings, f"{out_path}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_evaluation_is_shared_between_processes(small_setup, tmp_path):
    """Under torchrun each process embeds its share of the test set, and every process gets the whole of it,
    in order, equal to what one process computes; also with fewer videos and captions than processes."""
    clip_path, world = small_setup
    clip_state = torch.load(clip_path, weights_only=True)
    # 3 processes: the 8 captions and 8 videos do not split evenly, so shares of different lengths are joined.
    mp.spawn(_embedding_worker, args=(3, free_port(), clip_state, world, str(tmp_path / "embeddings")), nprocs=3,
             join=True)
    clip = CLIP(SMALL_CLIP)
    clip.load_state_dict(clip_state)
    torch.manual_seed(1)
    model = VoP(clip, VoPConfig("pos", num_frames=4))
    expected = [evaluate.embed(model, test_set, batch_size=3, num_workers=0) for test_set in _test_sets(world)]
    assert [len(text) for text, _ in expected] == [8, 2] and [len(video) for _, video in expected] == [8, 2]
    for rank in range(3):
        for (shared_text, shared_video), (text, video) in zip(torch.load(f"{tmp_path / 'embeddings'}.{rank}"),
                                                              expected):
            torch.testing.assert_close(shared_text, text)
            torch.testing.assert_close(shared_video, video)


TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
                      "reduce_scatter_tensor", "scatter", "gather", "all_to_all", "all_to_all_single", "send", "recv")


def _torchrun_worker(rank, world_size, port, config, devices_path):
    """train.train as torchrun starts it, with every tensor collective recording the device of its tensors."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    seen = set()

    def recording(collective):
        def wrapped(*args, **kwargs):
            for value in [*args, *kwargs.values()]:
                for tensor in (value if isinstance(value, (list, tuple)) else [value]):
                    if torch.is_tensor(tensor):
                        seen.add((collective.__name__, tensor.device.type))
            return collective(*args, **kwargs)
        return wrapped

    for name in TENSOR_COLLECTIVES:
        if hasattr(torch.distributed, name):
            setattr(torch.distributed, name, recording(getattr(torch.distributed, name)))
    train.train(config)
    torch.save(sorted(seen), f"{devices_path}.{rank}")


@pytest.mark.slow
def test_train_under_torchrun_style_launch(small_setup, tmp_path):
    """train.train with RANK/WORLD_SIZE set, as torchrun launches it: 2 CPU processes, gloo, global batch 8.

    On a GPU machine the process group must serve every tensor a collective is handed: the gradients and
    embeddings live on the GPU, a count may live on the CPU. NCCL alone refuses CPU tensors (a CPU count
    handed to all_reduce would stop the run at the end of its first epoch), so every device type the
    collectives see here must be one that the backend chosen for a CUDA run serves."""
    config = small_config(small_setup, tmp_path / "run", epochs=1, eval_each_epoch=True)
    mp.spawn(_torchrun_worker, args=(2, free_port(), config, str(tmp_path / "devices")), nprocs=2, join=True)
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["step"] == 32 // 8  # steps count global batches: each process saw 4 of its own
    assert len(checkpoint["history"]) == 1 and "t2v" in checkpoint["history"][0]  # rank 0 evaluated
    losses = [record["loss"] for record in read_log(tmp_path / "run") if "loss" in record]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    served = backend_devices(distributed.backend_for(torch.device("cuda")))
    for rank in range(2):
        seen = torch.load(f"{tmp_path / 'devices'}.{rank}")
        assert {"all_gather", "all_reduce"} <= {name for name, _ in seen}  # the loss and the gradient sum
        assert {device for _, device in seen} <= served, seen


def backend_devices(backend: str) -> set[str]:
    """The device types a torch.distributed backend string serves: "cpu:gloo,cuda:nccl" -> {"cpu", "cuda"},
    "nccl" -> {"cuda"}, "gloo" -> {"cpu", "cuda"}."""
    if ":" in backend:
        return {part.split(":")[0] for part in backend.split(",")}
    return {"nccl": {"cuda"}, "gloo": {"cpu", "cuda"}}[backend]


def test_the_cuda_backend_serves_cpu_tensors_too():
    backend = distributed.backend_for(torch.device("cuda"))
    assert "cuda:nccl" in backend.split(",") and backend_devices(backend) == {"cpu", "cuda"}
    assert backend_devices("nccl") == {"cuda"}  # what a CPU count would have met


def test_bf16_autocast_on_cpu(small_setup, tmp_path):
    results = train.train(small_config(small_setup, tmp_path, epochs=1, precision="bf16"))
    losses = [record["loss"] for record in read_log(tmp_path) if "loss" in record]
    assert all(math.isfinite(loss) for loss in losses) and 0 <= results["t2v"]["R@1"] <= 100


# -- whole runs on the small synthetic world --------------------------------------------------------------

def test_training_lowers_the_loss_and_saves_only_trainable_tensors(small_setup, tmp_path):
    config = small_config(small_setup, tmp_path, epochs=4, lr=1e-2)
    results = train.train(config)
    losses = [record["loss"] for record in read_log(tmp_path) if "loss" in record]
    assert len(losses) == 4 * (32 // 8)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # the last epoch's mean loss is below the first's
    assert set(results) >= {"t2v", "v2t"}

    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    model = VoP(CLIP(SMALL_CLIP), VoPConfig(**checkpoint["vop_config"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(checkpoint["trainable"]) == trainable  # no frozen CLIP weight in the file
    assert checkpoint["step"] == 16 and checkpoint["config"]["prompts"] == "pos"
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "run.lock").exists()
    # evaluate.py rebuilds the recorded backbone and the prompts from the checkpoint alone: the same numbers.
    again = evaluate.main(["--checkpoint", str(tmp_path / "last.pt"), "--num-workers", "0", "--device", "cpu"])
    assert again["t2v"] == pytest.approx(results["t2v"]) and again["v2t"] == pytest.approx(results["v2t"])


def test_resume_continues_exactly(small_setup, tmp_path, monkeypatch):
    straight = small_config(small_setup, tmp_path / "straight", save_every=1)
    train.train(straight)

    interrupted = small_config(small_setup, tmp_path / "interrupted", save_every=1)
    real_loss, calls = train.contrastive_loss, []

    def crash_at_step_6(*args):
        calls.append(1)
        if len(calls) == 6:  # mid-way through the second epoch
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(train, "contrastive_loss", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train.train(interrupted)
    monkeypatch.setattr(train, "contrastive_loss", real_loss)
    assert torch.load(tmp_path / "interrupted" / "last.pt", weights_only=True)["step"] == 5
    train.train(dataclasses.replace(interrupted, resume="auto"))

    final_straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    final_resumed = torch.load(tmp_path / "interrupted" / "last.pt", weights_only=True)
    assert final_resumed["step"] == final_straight["step"] == 8
    for name, tensor in final_straight["trainable"].items():
        torch.testing.assert_close(final_resumed["trainable"][name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    losses_straight = [r["loss"] for r in read_log(tmp_path / "straight") if "loss" in r]
    losses_resumed = [r["loss"] for r in read_log(tmp_path / "interrupted") if "loss" in r]
    assert losses_resumed == pytest.approx(losses_straight, rel=1e-5)


def stop_at_call(monkeypatch, call: int):
    """Make the `call`-th training loss raise KeyboardInterrupt (what Ctrl-C does mid-step)."""
    real_loss, calls = train.contrastive_loss, []

    def stop(*args):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(train, "contrastive_loss", stop)
    return lambda: monkeypatch.setattr(train, "contrastive_loss", real_loss)


def test_a_resumed_run_logs_each_step_once(small_setup, tmp_path, monkeypatch):
    """Saved only at epoch ends: a stop at step 7 logged steps 5 and 6 after the checkpoint of step 4; resuming
    trains them again, and the log holds each step once (the curves do not run backwards)."""
    config = small_config(small_setup, tmp_path)
    undo = stop_at_call(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train.train(config)
    undo()
    assert [r["step"] for r in read_log(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    train.train(dataclasses.replace(config, resume="auto"))
    assert [r["step"] for r in read_log(tmp_path) if "loss" in r] == list(range(1, 9))


def test_a_cpu_run_continues_with_fp16_loss_scaling(small_setup, tmp_path, monkeypatch):
    """A checkpoint saved without loss scaling (fp32: its scaler state is empty) resumes under fp16's scaler."""
    config = small_config(small_setup, tmp_path, precision="fp32")
    undo = stop_at_call(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train.train(config)
    undo()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["scaler"] == {}
    loaded = []
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict", lambda self, state: loaded.append(state))
    monkeypatch.setattr(train, "training_step", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # stopped at its first step: what matters is that it got there
        train.train(dataclasses.replace(config, resume="auto", precision="fp16"))
    assert loaded == []  # an empty state is not loaded into an enabled scaler (torch refuses it)


def test_a_stop_before_the_first_save_of_a_run_resumed_from_elsewhere_says_nothing_is_saved_here(
        small_setup, tmp_path, monkeypatch):
    first = small_config(small_setup, tmp_path / "first")
    undo = stop_at_call(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train.train(first)  # leaves first/last.pt at step 4
    undo()
    undo = stop_at_call(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt, match="Nothing was saved yet"):  # second/last.pt does not exist
        train.train(dataclasses.replace(first, out_dir=str(tmp_path / "second"), resume=str(tmp_path / "first" /
                                                                                            "last.pt")))
    undo()


def test_an_evaluation_only_run_keeps_the_list_of_skipped_training_videos(small_setup, tmp_path):
    (tmp_path / "skipped_videos.txt").write_text("bad.mp4\tcannot open\n")  # the trained run's list
    (tmp_path / "unreadable_test_videos.txt").write_text("gone.mp4\tcannot open\n")
    train.train(small_config(small_setup, tmp_path, epochs=0))
    assert (tmp_path / "skipped_videos.txt").read_text() == "bad.mp4\tcannot open\n"
    assert not (tmp_path / "unreadable_test_videos.txt").exists()  # every test video reads now


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(small_setup, tmp_path, monkeypatch):
    config = small_config(small_setup, tmp_path, save_every=1)
    real_loss, calls = train.contrastive_loss, []

    def nan_at_step_3(*args):
        calls.append(1)
        return real_loss(*args) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(train, "contrastive_loss", nan_at_step_3)
    with pytest.raises(FloatingPointError, match="at step 3") as stopped:  # steps 1 and 2 went well
        train.train(config)
    assert isinstance(stopped.value, UserError)  # one line, no traceback: a setting to change, not a bug
    assert "--resume auto --precision bf16" in str(stopped.value) and "lower --lr" in str(stopped.value)
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["trainable"].values())


def test_resuming_with_another_prompt_configuration_is_refused(small_setup, tmp_path):
    train.train(small_config(small_setup, tmp_path, epochs=1))
    with pytest.raises(checkpoints.CheckpointError, match="vop"):
        train.train(small_config(small_setup, tmp_path, epochs=1, prompts="fn", resume="auto"))


# -- the output folder, weight decay, the recorded backbone -----------------------------------------------

def test_the_default_out_dir_does_not_depend_on_the_order_the_prompts_were_typed():
    # train.py names the run from VoPConfig's video prompts, which are in VoPConfig's order
    runs_of = [runs.default_out_dir("msrvtt-9k", "prompts", VoPConfig(prompts).video_prompts)
               for prompts in ("fn,pos", "pos,fn", " pos , fn")]
    assert runs_of[0] == runs_of[1] == runs_of[2] == str(Path("runs") / "msrvtt-9k" / "vop-pos-fn")


def test_weight_decay_applies_to_matrices_and_prompts_not_to_norms_and_biases(tiny_clip):
    model = VoP(tiny_clip, VoPConfig("pos,ctx,fn", num_frames=4, fn_layers=1))
    optimizer = train.make_optimizer(model, lr=1e-3, weight_decay=0.2)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for group in optimizer.param_groups if group["weight_decay"] for p in group["params"]}
    not_decayed = {names[id(p)] for group in optimizer.param_groups if not group["weight_decay"]
                   for p in group["params"]}
    assert decayed == {"text_prompts.tokens", "visual_prompts.tokens", "position_prompts.tokens",
                       "function_prompts.tokens", "function_prompts.frame_position", "context_prompts.to_tokens.weight",
                       "context_prompts.context.weight_ih_l0", "context_prompts.context.weight_hh_l0",
                       "context_prompts.context.weight_ih_l0_reverse", "context_prompts.context.weight_hh_l0_reverse"}
    assert not_decayed == {"context_prompts.to_tokens.bias", "context_prompts.context.bias_ih_l0",
                           "context_prompts.context.bias_hh_l0", "context_prompts.context.bias_ih_l0_reverse",
                           "context_prompts.context.bias_hh_l0_reverse"}
    full = train.make_optimizer(VoP(tiny_clip, VoPConfig(tune="full", num_frames=4)), lr=1e-6, weight_decay=0.2)
    no_decay = full.param_groups[1]["params"]
    assert all(p.ndim < 2 for p in no_decay) and all(p.ndim >= 2 for p in full.param_groups[0]["params"])
    assert len(no_decay) > 0 and full.param_groups[1]["weight_decay"] == 0.0


def test_a_relative_clip_path_is_recorded_resolved_so_evaluation_works_from_anywhere(small_setup, tmp_path,
                                                                                      monkeypatch):
    clip_path, world = small_setup
    monkeypatch.chdir(clip_path.parent)
    results = train.train(small_config(small_setup, tmp_path / "run", clip=clip_path.name, epochs=1))
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["run"]["backbone"] == str(clip_path.resolve())
    monkeypatch.chdir(tmp_path)  # another folder: the relative name would now point nowhere
    again = evaluate.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--num-workers", "0", "--device", "cpu"])
    assert again["t2v"] == pytest.approx(results["t2v"])
