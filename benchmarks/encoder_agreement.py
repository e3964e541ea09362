"""How much the encoder's bfloat16 attention moves what the decoder predicts, token by token.

    python -m benchmarks.encoder_agreement MODEL_DIR CORPUS AUDIO [--clips 40] [--windows 12] [--threads 2]

Takes the first ``--clips`` clips of CORPUS (its ``clips.jsonl``) and ``--windows`` consecutive 30 s windows of
AUDIO (a long recording, from its 60th second on), and runs krasr-batch's torch encoder (engines/encoder.py)
over their log-mel features three ways: float32, bfloat16 with PyTorch's flash-attention kernel, and bfloat16
with ``engines.encoder.attention``'s two products (the default on CPUs since stop 44). transformers' float32
decoder then decodes each input greedily (Kazakh forced) from the float32 encoder's output, and is run again
over that transcript (teacher forcing) from each bfloat16 output. A row says on how many of those positions
the next token it ranks first is float32's, the mean KL divergence from float32's next-token distribution, and
how far the encoder output is from float32's (norm of the difference over the norm). Beam search over
near-ties amplifies any such difference into another path; this compares the precisions where they act.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("corpus")
    ap.add_argument("audio")
    ap.add_argument("--clips", type=int, default=40)
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import torch
    from transformers import WhisperForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutput

    from benchmarks.cost_windows import flash_kernel_in_encoder, long_windows
    from krasr_batch.audio import load_audio
    from krasr_batch.engines.base import NumpyLogMel
    from krasr_batch.engines.encoder import TorchEncoder

    torch.set_num_threads(a.threads)
    with open(os.path.join(a.corpus, "clips.jsonl"), encoding="utf-8") as f:
        clips = [json.loads(line) for line in f if line.strip()][: a.clips]
    audios = [load_audio(os.path.join(a.corpus, c["path"])) for c in clips]
    feats = [NumpyLogMel.from_pretrained(a.model)(audios)["input_features"]] if audios else []
    if a.windows:
        feats.append(long_windows(a.model, a.audio, a.windows)[1])  # its windows' features, made once
    feats = torch.from_numpy(np.ascontiguousarray(np.concatenate(feats), dtype=np.float32))

    low = TorchEncoder(a.model, "bfloat16")
    with torch.inference_mode():
        outputs = {"float32": TorchEncoder(a.model, "float32").encode(feats).float()}
        with flash_kernel_in_encoder():
            outputs["bfloat16, flash-attention kernel"] = low.encode(feats).float()
        outputs["bfloat16, two products (default)"] = low.encode(feats).float()

        model = WhisperForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32).eval()
        prompt = [model.generation_config.decoder_start_token_id, model.generation_config.lang_to_id["<|kk|>"],
                  model.generation_config.task_to_id["transcribe"], model.generation_config.no_timestamps_token_id]
        ref_out = outputs["float32"]
        rows = {name: [0, 0, 0.0] for name in outputs if name != "float32"}
        for i in range(len(feats)):
            ids = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=ref_out[i:i + 1]),
                                 decoder_input_ids=torch.tensor([prompt]), max_new_tokens=a.max_new_tokens,
                                 num_beams=1, do_sample=False)[:, :-1]

            def next_token_logprobs(hidden, ids=ids):
                state = model.model.decoder(input_ids=ids, encoder_hidden_states=hidden).last_hidden_state
                return model.proj_out(state)[0, len(prompt) - 1:].log_softmax(-1)

            ref = next_token_logprobs(ref_out[i:i + 1])
            for name, row in rows.items():
                mine = next_token_logprobs(outputs[name][i:i + 1])
                row[0] += int((mine.argmax(-1) == ref.argmax(-1)).sum())
                row[1] += mine.shape[0]
                row[2] += float((ref.exp() * (ref - mine)).sum())

    print(f"{len(clips)} clips and {a.windows} windows of 30 s, {a.threads} thread(s); greedy float32 transcripts, "
          "teacher-forced\n")
    print("| encoder | next token as float32's | mean KL from float32 (nats) | encoder output vs float32 |")
    print("|---|---|---|---|")
    for name, (agree, total, kl) in rows.items():
        rel = float((outputs[name] - ref_out).norm() / ref_out.norm())
        print(f"| {name} | {agree} of {total} ({100 * agree / max(total, 1):.2f} %) | {kl / max(total, 1):.5f} | "
              f"{100 * rel:.2f} % |")


if __name__ == "__main__":
    main()
