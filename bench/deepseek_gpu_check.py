"""DeepSeek-V3 on a CUDA device: the latent-attention torch path and MTP drafting.

Builds a small random DeepSeek-V3 with ``transformers`` (dense and MoE layers, grouped
routing, YaRN) plus MTP weights, then on the GPU checks that

- fp32 greedy tokens equal ``transformers``' on the same device, logprobs within 2e-3;
- bf16 runs, and how many greedy tokens agree with ``transformers`` bf16 is printed (for
  information: random tiny models have near-ties that bf16 rounding flips either way);
- greedy outputs with ``{"method": "mtp"}`` equal speculation off, and drafts are accepted.

Prints one line per check and exits non-zero if one fails::

    python bench/deepseek_gpu_check.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams
from tests.engine_service.deepseek_checkpoints import write_mtp_checkpoint
from tests.engine_service.test_parity import _prompts


def hf_greedy(model, prompt: list[int], max_new: int, device: str):
    out = model.generate(
        torch.tensor([prompt], device=device),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
        max_new_tokens=max_new,
        min_new_tokens=max_new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.logits, tokens)]
    return tokens, logprobs


def main() -> int:
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of the script
    failures = 0
    path = Path(tempfile.mkdtemp())
    write_mtp_checkpoint(path)
    prompts = _prompts(320)
    max_new = 16
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True, logprobs=0)

    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch_dtype)
        hf = hf.to(device).eval()
        with torch.no_grad():
            expected = [hf_greedy(hf, p, max_new, device) for p in prompts]
        del hf
        engine = LLMEngine(
            EngineConfig(model=str(path), dtype=dtype, device=device, num_kv_blocks=256)
        )
        got_tokens, got_logprobs = {}, {}
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        while engine.has_unfinished():
            for out in engine.step():
                got_tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                got_logprobs.setdefault(out.request_id, []).extend(
                    lp.logprob for lp in out.new_logprobs or []
                )
        same = sum(
            a == b for i, (want, _) in enumerate(expected) for a, b in zip(got_tokens[str(i)], want)
        )
        total = len(prompts) * max_new
        drift = max(
            abs(a - b)
            for i, (_, want) in enumerate(expected)
            for a, b in zip(got_logprobs[str(i)], want)
        )
        ok = same == total and drift < 2e-3 if dtype == "float32" else True
        failures += not ok
        print(
            f"{'ok  ' if ok else 'FAIL'} parity {dtype}: {same}/{total} tokens equal, "
            f"max logprob diff {drift:.2e}{'' if dtype == 'float32' else ' (information)'}"
        )

    plain = LLMEngine(EngineConfig(model=str(path), device=device, num_kv_blocks=256))
    spec = LLMEngine(
        EngineConfig(
            model=str(path),
            device=device,
            num_kv_blocks=256,
            speculative_config='{"method": "mtp", "num_speculative_tokens": 3}',
        )
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    equal = plain.generate(prompts, greedy) == spec.generate(prompts, greedy)
    stats = spec.stats()
    ok = equal and stats.spec_num_accepted_tokens > 0
    failures += not ok
    print(
        f"{'ok  ' if ok else 'FAIL'} mtp lossless: outputs equal {equal}, accepted "
        f"{stats.spec_num_accepted_tokens}/{stats.spec_num_draft_tokens} drafts"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
