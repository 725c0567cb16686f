"""balancer.decoder: the packed decoder calibration and measured plans run, built on its device."""

import numpy as np
import pytest
import torch

import strategies.kernels
from balancer.decoder import build_decoder, decoder_step_fn, pack_batch
from balancer.specs import model_preset
from strategies.kernels import choose_kernel, reference_attention

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(ids: list[torch.Tensor]):
    """A packed batch holding exactly these token sequences."""
    spec = model_preset("tiny")
    batch = pack_batch([t.numel() for t in ids], spec.vocab_size, CPU, torch.Generator().manual_seed(0))
    flat = torch.cat(ids)
    labels = batch.labels.clone()
    labels[:-1] = flat[1:]
    labels[batch.cu_seqlens[1:].long() - 1] = -100
    return type(batch)(input_ids=flat, labels=labels, positions=batch.positions, segments=batch.segments,
                       lengths=batch.lengths)


def test_pack_batch_restarts_positions_and_masks_sequence_ends():
    b = pack_batch([3, 1, 2], 50, CPU, torch.Generator().manual_seed(0))
    assert b.positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert b.cu_seqlens.tolist() == [0, 3, 4, 6] and b.cu_seqlens.dtype == torch.int32
    assert b.segments.pairs == ((0, 3, 0, 3), (3, 4, 3, 4), (4, 6, 4, 6)) and b.segments.square
    ids, labels = b.input_ids.tolist(), b.labels.tolist()
    assert labels == [ids[1], ids[2], -100, -100, ids[5], -100]
    assert b.max_seqlen == 3 and b.loss_tokens == 3
    with pytest.raises(ValueError, match="must be one or more sequences of >= 1 token"):
        pack_batch([3, 0], 50, CPU, torch.Generator())


def test_decoder_matches_the_spec_and_trains():
    spec = model_preset("tiny")
    net = build_decoder(spec, CPU, torch.float32, seed=1)
    assert sum(p.numel() for p in net.parameters()) == spec.num_parameters
    assert net.attention == "sdpa" == choose_kernel("auto", CPU, torch.float32)  # the CPU has no varlen kernel
    ids = torch.randint(0, spec.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    batch = _batch([ids])
    loss = net(batch)
    assert abs(loss.item() - np.log(spec.vocab_size)) < 1.0  # near uniform at initialisation
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(8):
        opt.zero_grad()
        net(batch).backward()
        opt.step()
    assert net(batch).item() < loss.item() - 1.0  # memorises one sequence


def test_packed_sequences_do_not_see_each_other():
    """Every sequence of a packed micro-batch gets exactly the hidden states and loss it gets
    alone: attention is causal inside each sequence, positions restart, the loss stays in it."""
    spec = model_preset("tiny")
    net = build_decoder(spec, CPU, torch.float32, seed=2)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, spec.vocab_size, (n,), generator=g) for n in (17, 5, 30)]
    hidden: list[torch.Tensor] = []
    net.norm.register_forward_hook(lambda _m, _i, out: hidden.append(out))
    with torch.no_grad():
        packed_loss = net(_batch(seqs))
        alone_losses = [net(_batch([s])) for s in seqs]
    packed, alone = hidden[0], hidden[1:]
    assert torch.allclose(packed, torch.cat(alone), atol=1e-5)
    weights = torch.tensor([s.numel() - 1.0 for s in seqs])
    assert packed_loss.item() == pytest.approx(float((torch.stack(alone_losses) * weights).sum() / weights.sum()), rel=1e-5)
    # ... and causal: changing a sequence's future leaves its past alone
    changed = seqs[2].clone()
    changed[20:] = (changed[20:] + 1) % spec.vocab_size
    with torch.no_grad():
        net(_batch([seqs[0], seqs[1], changed]))
    start = 17 + 5
    assert torch.allclose(hidden[-1][: start + 20], packed[: start + 20], atol=1e-5)
    assert not torch.allclose(hidden[-1][start + 20 :], packed[start + 20 :])


def test_depth_runs_the_first_blocks_only():
    spec = model_preset("tiny")
    net = build_decoder(spec, CPU, torch.float32)
    calls = []
    for k, block in enumerate(net.blocks):
        block.register_forward_hook(lambda _m, _i, _o, k=k: calls.append(k))
    batch = pack_batch([8, 8], spec.vocab_size, CPU, torch.Generator().manual_seed(0))
    net(batch, depth=0)
    net(batch, depth=1)
    net(batch)
    assert calls == [0, 0, 1]


def test_a_7b_shape_is_built_on_its_device_in_its_dtype():
    """Construction happens on the target device in the compute dtype: on the meta device a
    Llama-7B shape costs no memory at all, and no parameter ever exists in fp32 on the host."""
    spec = model_preset("llama-7b")
    net = build_decoder(spec, torch.device("meta"), torch.bfloat16)
    params = list(net.parameters())
    assert sum(p.numel() for p in params) == spec.num_parameters == 6_738_415_616
    assert {p.device.type for p in params} == {"meta"} and {p.dtype for p in params} == {torch.bfloat16}
    assert net.inv_freq.dtype == torch.float32  # rotary frequencies stay exact
    small = build_decoder(model_preset("tiny"), CPU, torch.bfloat16)
    assert {p.dtype for p in small.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored


def test_attention_is_the_shared_kernel_choice():
    """``attention=`` resolves through strategies.kernels.choose_kernel: its names, its errors."""
    assert build_decoder(model_preset("tiny"), CPU, torch.bfloat16, attention="sdpa").attention == "sdpa"
    with pytest.raises(ValueError, match=r"'varlen' cannot run on cpu with torch.bfloat16; available there: \['sdpa'\]"
                                         r" .*ask for 'auto' or one of those"):
        build_decoder(model_preset("tiny"), CPU, torch.bfloat16, attention="varlen")
    with pytest.raises(ValueError, match=r"attention kernel 'flash' is unknown; choose 'auto' or one of "
                                         r"\['flash_attn', 'varlen', 'sdpa'\]"):
        build_decoder(model_preset("tiny"), CPU, torch.float32, attention="flash")


_DEVICES = [(CPU, torch.float32)] + ([(torch.device("cuda"), torch.bfloat16)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device, dtype", _DEVICES, ids=lambda x: str(x).removeprefix("torch."))
def test_attention_equals_the_dense_reference(monkeypatch, device, dtype):
    """The decoder's attention (outputs and, through the loss, gradients) is the dense masked
    reference on a packed batch with grouped-query heads: same loss, same gradients — with
    whichever kernel the device gets (on CUDA: flash_attn or varlen, after their self-check)."""
    spec = model_preset("tiny")
    assert spec.num_kv_heads < spec.num_heads  # grouped-query heads are exercised
    kernel = choose_kernel("auto", device, dtype)
    g = torch.Generator().manual_seed(5)
    batch = pack_batch([23, 1, 40, 9], spec.vocab_size, device, g)
    calls = []

    def dense(q, k, v, seg, kernel="auto"):
        calls.append(kernel)
        return reference_attention(q, k, v, seg)

    results = []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(strategies.kernels, "causal_attention", dense)
        net = build_decoder(spec, device, dtype, seed=4)
        assert net.attention == kernel
        loss = net(batch)
        loss.backward()
        results.append((loss.detach().float(), {n: p.grad.float() for n, p in net.named_parameters()}))
    assert calls == [kernel] * spec.num_layers  # the reference really stood in for the kernel
    (loss, grads), (ref_loss, ref_grads) = results
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    for name, grad in grads.items():
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(grad, ref_grads[name], rtol=10 * tol, atol=10 * tol * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_step_runs_forward_and_backward_and_drops_gradients():
    step = decoder_step_fn(model_preset("tiny"), CPU, torch.float32)
    step((40, 3, 17))
    step((9,), depth=0)
    assert step.attention == "sdpa"
    assert all(p.grad is None for p in step.net.parameters())
