"""VoP and its prompts: shapes, the paper's parameter counts, neutrality, order sensitivity, gradients."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from clip_model import CLIP, CLIPConfig
from prompts import ContextPrompts, FunctionPrompts, PositionPrompts, TextPrompts, VisualPrompts
from vop import VoP, VoPConfig, count_parameters, describe_parameters, parse_video_prompts

ALL_COMBINATIONS = [",".join(c) for r in range(4) for c in itertools.combinations(("pos", "ctx", "fn"), r)]
TINY_FRAMES = 4
SOT, EOT = 998, 999  # the tiny fixture CLIP's vocabulary of 1,000


def tiny_vop(clip, video_prompts="", grad_checkpointing=False, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("num_frames", TINY_FRAMES)
    kwargs.setdefault("fn_layers", 2)  # the tiny CLIP has 3 visual layers
    return VoP(clip, VoPConfig(video_prompts, **kwargs), grad_checkpointing=grad_checkpointing)


def tiny_videos(num_videos=2, num_frames=TINY_FRAMES, seed=1):
    return torch.randn(num_videos, num_frames, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def tiny_tokens(lengths=(5, 9), context_length=69):
    tokens = torch.zeros(len(lengths), context_length, dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens[row, 0] = SOT
        tokens[row, 1:length - 1] = torch.arange(10, 10 + length - 2)
        tokens[row, length - 1] = EOT
    return tokens


def test_prompt_module_shapes():
    B, F_, D = 2, 12, 32
    assert TextPrompts(12, 8, D)(3).shape == (8, D)
    assert VisualPrompts(12, 8, D)(11).shape == (8, D)
    assert PositionPrompts(12, F_, 4, D)(0).shape == (F_, 4, D)
    assert ContextPrompts(4, D)(torch.randn(B, F_, D)).shape == (B, F_, 4, D)
    function_prompts = FunctionPrompts(range(8, 12), F_, 8, D)  # layers K = 8 .. 11
    assert function_prompts(11).shape == (8, D) and function_prompts.frame_position.shape == (F_, D)
    assert torch.equal(function_prompts(8), function_prompts.tokens[0])
    assert torch.count_nonzero(function_prompts.frame_position) == 0


def test_parse_video_prompts():
    assert parse_video_prompts("fn, pos") == ("pos", "fn") == parse_video_prompts(["pos", "fn"])
    assert parse_video_prompts("") == ()
    with pytest.raises(ValueError, match="time"):
        parse_video_prompts("pos,time")


@pytest.mark.parametrize("video_prompts", ALL_COMBINATIONS)
def test_shapes_on_tiny_clip(tiny_clip, video_prompts):
    model = tiny_vop(tiny_clip, video_prompts)
    with torch.no_grad():
        video_embeddings, text_embeddings = model(tiny_videos(), tiny_tokens())
    assert video_embeddings.shape == (2, 64) and text_embeddings.shape == (2, 64)
    torch.testing.assert_close(video_embeddings.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(text_embeddings.norm(dim=-1), torch.ones(2))
    num_frame_prompts = model.frame_prompts(0, torch.zeros(2 * TINY_FRAMES, 17, 128), TINY_FRAMES).shape[1]
    assert num_frame_prompts == (12 if ("pos" in video_prompts and "ctx" in video_prompts) else 8)


# -- the token-sequence table of vop.py's docstring, row by row --------------------------------------------
# The tiny CLIP: 64-pixel images in 16-pixel patches (N = 16), 3 visual and 2 text layers, width D = 128.

def block_inputs(blocks) -> list:
    """Run with a forward pre-hook on each block; returns the list that fills with each block's input shape."""
    shapes = []
    for block in blocks:
        block.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    return shapes


def test_text_sequence_every_layer(tiny_clip):
    """text, every layer: [SOS] | P text prompts | caption tokens ... [EOT]  (B, P + L, D)."""
    model = tiny_vop(tiny_clip)
    shapes = block_inputs(tiny_clip.transformer.resblocks)
    with torch.no_grad():
        model.encode_text(tiny_tokens(lengths=(5, 9)))  # L = 9: the padding after the last [EOT] is cut
    assert shapes == [(2, 8 + 9, 128)] * 2


@pytest.mark.parametrize("video_prompts, num_prompts", [("", 8), ("pos", 8), ("ctx", 8), ("pos,ctx", 12)])
def test_frame_sequence_every_layer(tiny_clip, video_prompts, num_prompts):
    """frame, every layer: [CLS] | P visual prompts | N patch tokens  (B*F, 1 + P + N, D); P = 8, or with pos
    and ctx together 4 shared | 4 position | 4 generated."""
    model = tiny_vop(tiny_clip, video_prompts)
    shapes = block_inputs(tiny_clip.visual.transformer.resblocks)
    with torch.no_grad():
        model.encode_video(tiny_videos(num_videos=2))
    assert shapes == [(2 * TINY_FRAMES, 1 + num_prompts + 16, 128)] * 3


def test_function_prompts_sequences_below_and_from_layer_k(tiny_clip):
    """fn: layers 0..K-1 per frame (B*F, 1 + P + N, D); layers K.. per video: F x [CLS] | P video prompts |
    F*N patch tokens  (B, F + P + F*N, D)."""
    model = tiny_vop(tiny_clip, "fn", fn_layers=2)  # K = 2 of the tiny CLIP's 3 visual layers
    shapes = block_inputs(tiny_clip.visual.transformer.resblocks)
    with torch.no_grad():
        model.encode_video(tiny_videos(num_videos=2))
    per_frame, per_video = (2 * TINY_FRAMES, 1 + 8 + 16, 128), (2, TINY_FRAMES + 8 + TINY_FRAMES * 16, 128)
    assert shapes == [per_frame, per_frame, per_video]


@pytest.mark.slow
@pytest.mark.parametrize("video_prompts", ALL_COMBINATIONS)
def test_shapes_on_vit_b32(vit_b32_clip, video_prompts):
    model = VoP(vit_b32_clip, VoPConfig(video_prompts, num_frames=3))
    with torch.no_grad():
        video_embeddings = model.encode_video(torch.randn(1, 3, 3, 224, 224))
        text_embeddings = model.encode_text(model.tokenize(["a dog runs on the grass"]))
    assert video_embeddings.shape == (1, 512) and text_embeddings.shape == (1, 512)
    assert model.text_context_length == 69


# Trainable parameters on ViT-B/32 with 12 frames, as the paper's MSR-VTT table reports them (0.1M, 0.5M, 14.3M,
# 0.1M, 0.4M, 14.1M), built literally from Sec. 3 (VoP^F's frame position embedding added to its count). All
# round to the paper's figures but fn,ctx: the literal build has 14.28M where the paper reports 14.1M.
PAPER_COUNTS = {
    "": 122_880, "pos": 528_384, "ctx": 14_257_152,
    "fn": 122_880 + 9_216, "fn,pos": 393_216 + 9_216, "fn,ctx": 14_269_440 + 9_216,
}


@pytest.mark.parametrize("video_prompts", PAPER_COUNTS)
def test_trainable_parameter_counts_match_the_paper(video_prompts):
    with torch.device("meta"):  # counting needs shapes only
        model = VoP(CLIP(CLIPConfig()), VoPConfig(video_prompts, num_frames=12))
    assert count_parameters(model)[0] == PAPER_COUNTS[video_prompts]


def test_baseline_modes_train_what_they_say():
    with torch.device("meta"):
        clip = CLIP(CLIPConfig())
        counts = {tune: count_parameters(VoP(clip, VoPConfig(tune=tune)))[0]
                  for tune in ("zero-shot", "full", "partial", "bias", "proj")}
    total = sum(p.numel() for p in clip.parameters())
    assert counts["zero-shot"] == 0
    assert counts["full"] == total - 1  # everything but the frozen logit scale
    assert counts["proj"] == 768 * 512 + 512 * 512
    assert counts["partial"] == sum(p.numel() for p in clip.visual.transformer.resblocks[-1].parameters()) + \
        sum(p.numel() for p in clip.transformer.resblocks[-1].parameters())
    assert counts["bias"] == sum(p.numel() for n, p in clip.named_parameters() if n.endswith("bias"))
    with pytest.raises(ValueError, match="video_prompts.*tune"):
        VoPConfig("pos", tune="full")


def test_describe_parameters_reads_like_the_paper():
    with torch.device("meta"):
        text = describe_parameters(VoP(CLIP(CLIPConfig())))
    assert text.startswith("0.12M trainable (122,880), 0.081% of all 151.40M")


def test_without_prompt_tokens_vop_is_plain_clip(tiny_clip):
    """The insertion/removal logic is neutral: zero prompt tokens give CLIP's own embeddings."""
    model = tiny_vop(tiny_clip, num_text_prompts=0, num_visual_prompts=0)
    videos, tokens = tiny_videos(), tiny_tokens(context_length=77)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), F.normalize(tiny_clip.encode_text(tokens), dim=-1),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(model.encode_frames(videos),
                                   tiny_clip.encode_image(videos.flatten(0, 1)).view(2, TINY_FRAMES, -1),
                                   atol=1e-6, rtol=0)
    zero_shot = tiny_vop(tiny_clip, tune="zero-shot")
    with torch.no_grad():
        torch.testing.assert_close(zero_shot.encode_text(tokens), model.encode_text(tokens), atol=1e-6, rtol=0)


def test_prompts_change_the_embeddings(tiny_clip):
    plain = tiny_vop(tiny_clip, tune="zero-shot")
    prompted = tiny_vop(tiny_clip)
    videos, tokens = tiny_videos(), tiny_tokens()
    with torch.no_grad():
        assert not torch.allclose(plain.encode_video(videos), prompted.encode_video(videos), atol=1e-4)
        assert not torch.allclose(plain.encode_text(tokens), prompted.encode_text(tokens), atol=1e-4)


def test_text_read_out_is_at_the_shifted_eot(tiny_clip):
    """Tokens after [EOT] (padding) cannot change the sentence embedding, tokens before it do."""
    model = tiny_vop(tiny_clip)
    tokens = tiny_tokens(lengths=(5,))
    after, before = tokens.clone(), tokens.clone()
    after[0, 6] = 42
    before[0, 2] = 42
    with torch.no_grad():
        reference = model.encode_text(tokens)
        torch.testing.assert_close(model.encode_text(after), reference, atol=1e-6, rtol=0)
        assert not torch.allclose(model.encode_text(before), reference, atol=1e-4)


def test_captions_too_long_for_the_prompt_budget(tiny_clip):
    model = tiny_vop(tiny_clip)
    padded = tiny_tokens(context_length=77)  # fine: only padding lies beyond position 69
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(padded), model.encode_text(padded[:, :69]))
    too_long = tiny_tokens(lengths=(75,), context_length=77)
    with pytest.raises(ValueError, match="context_length=69"):
        model.encode_text(too_long)


@pytest.mark.parametrize("video_prompts", ALL_COMBINATIONS)
def test_frame_order(tiny_clip, video_prompts):
    """Mean pooling is order-blind, so plain VoP cannot tell a video from its reversal; video prompts can."""
    model = tiny_vop(tiny_clip, video_prompts)
    if model.function_prompts is not None:
        # Zero-initialised, the frame position embedding leaves the video-wide layers permutation-equivariant;
        # training moves it away from zero, which this stands in for.
        torch.nn.init.normal_(model.function_prompts.frame_position, std=0.5)
    videos = tiny_videos()
    with torch.no_grad():
        forward, reversed_ = model.encode_video(videos), model.encode_video(videos.flip(1))
    if video_prompts == "":
        torch.testing.assert_close(forward, reversed_, atol=1e-6, rtol=0)
    else:
        assert (forward - reversed_).abs().max() > 1e-5  # far above float noise (~1e-7)


@pytest.mark.parametrize("video_prompts", ALL_COMBINATIONS)
def test_video_embedding_does_not_depend_on_the_batch(tiny_clip, video_prompts):
    model = tiny_vop(tiny_clip, video_prompts)
    videos = tiny_videos(num_videos=3)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_video(videos[1:2]), model.encode_video(videos)[1:2],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("video_prompts,tune", [(vp, "prompts") for vp in ALL_COMBINATIONS] +
                         [("", tune) for tune in ("full", "partial", "bias", "proj")])
def test_gradients_reach_exactly_the_trainable_parameters(tiny_clip, video_prompts, tune):
    model = tiny_vop(tiny_clip, video_prompts, tune=tune)
    video_embeddings, text_embeddings = model(tiny_videos(), tiny_tokens())
    logits = model.logit_scale.exp() * text_embeddings @ video_embeddings.t()
    target = torch.arange(2)
    (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)).backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    assert not model.logit_scale.requires_grad


def test_tensors_of_another_configuration_are_refused(tiny_clip):
    saved = tiny_vop(tiny_clip, "pos")
    target = tiny_vop(tiny_clip, "fn")
    with pytest.raises(ValueError, match="position_prompts.tokens"):
        target.load_trainable_state_dict(saved.trainable_state_dict())


def test_config_is_checked_and_canonical():
    assert VoPConfig("fn, pos") == VoPConfig(("pos", "fn")) and VoPConfig().video_prompts == ()
    for bad, field in ((dict(num_frames=0), "num_frames"), (dict(tune="all"), "tune"),
                       (dict(video_prompts="pos", video_prompt_length=9), "video_prompt_length"),
                       (dict(num_text_prompts=-1), "num_text_prompts")):
        with pytest.raises(ValueError, match=field):
            VoPConfig(**bad)
    with torch.device("meta"):
        clip = CLIP(CLIPConfig())
        for k in (0, 12):  # K = 12 would be plain VoP
            with pytest.raises(ValueError, match="fn_layers"):
                VoP(clip, VoPConfig("fn", fn_layers=k))


def test_checkpoint_round_trip(tiny_clip):
    saved = tiny_vop(tiny_clip, "pos,ctx")
    torch.manual_seed(5)
    restored = VoP(tiny_clip, saved.config)
    restored.load_trainable_state_dict(saved.trainable_state_dict())
    videos = tiny_videos()
    with torch.no_grad():
        torch.testing.assert_close(restored.encode_video(videos), saved.encode_video(videos))


def test_checkpoints_of_small_prompt_sets_stay_small(vit_b32_clip):
    """Only trainable tensors are saved: VoP^{F+P} on ViT-B/32 is ~1.6 MB, not CLIP's 600 MB."""
    import io
    buffer = io.BytesIO()
    torch.save(VoP(vit_b32_clip, VoPConfig("fn,pos")).trainable_state_dict(), buffer)
    assert buffer.tell() < 2_000_000


@pytest.mark.parametrize("video_prompts", ["", "fn,ctx"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_clip, video_prompts):
    gradients = []
    for grad_checkpointing in (False, True):
        model = tiny_vop(tiny_clip, video_prompts, grad_checkpointing=grad_checkpointing).train()
        video_embeddings, text_embeddings = model(tiny_videos(), tiny_tokens())
        (text_embeddings @ video_embeddings.t()).trace().backward()
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, msg=name)


def test_layer_0_context_prompts_are_the_same_for_every_video(tiny_clip):
    """VoP^C read literally (Sec. 3.3.2): the [CLS] tokens entering layer 0 are the class embedding plus position 0
    for every frame of every video, so the layer-0 context prompts cannot depend on the video. Pinned, so that a
    change to this reading is a decision, not an accident."""
    torch.manual_seed(0)
    model = VoP(tiny_clip, VoPConfig("ctx", num_frames=4)).eval()
    calls = []
    model.context_prompts.register_forward_hook(lambda module, inputs, output: calls.append((inputs[0], output)))
    with torch.no_grad():
        model.encode_frames(torch.randn(2, 4, 3, 64, 64))  # two different videos
    layer_0_input, layer_0_prompts = calls[0]
    cls_at_layer_0 = tiny_clip.visual.class_embedding + tiny_clip.visual.positional_embedding[0]
    torch.testing.assert_close(layer_0_input, cls_at_layer_0.expand_as(layer_0_input))
    torch.testing.assert_close(layer_0_prompts[0], layer_0_prompts[1])  # the same for both videos
    assert not torch.allclose(layer_0_prompts[0, 0], layer_0_prompts[0, 1])  # the BiLSTM still tells positions apart
    later_input, later_prompts = calls[1]  # from layer 1 on, each frame's content enters
    assert not torch.allclose(later_prompts[0], later_prompts[1])
