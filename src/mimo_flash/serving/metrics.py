"""Serving metrics in Prometheus' text exposition format (counters, gauges, histograms)."""

from __future__ import annotations

import threading

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    def __init__(self, buckets) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, x: float) -> None:
        i = next((j for j, b in enumerate(self.buckets) if x <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += x

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for b, c in zip(self.buckets + (float("inf"),), self.counts, strict=True):
            cum += c
            le = "+Inf" if b == float("inf") else repr(b)
            out.append(f'{name}_bucket{{le="{le}"}} {cum}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {cum}"]


class Metrics:
    """What the scheduler counts; the scheduler thread writes, the HTTP side reads text()."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}
        self.rejected = 0  # queue full
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cached_prompt_tokens = 0  # prompt tokens restored from the prefix cache
        self.spec_draft_tokens = 0  # MTP drafts verified (speculative serving), summed over rows
        self.spec_accepted_tokens = 0  # of which the target model agreed with
        self.spec_steps: dict[int, int] = {}  # drafts k -> decode steps that carried speculating slots
        # the scheduler thread's wall time per phase of its steps ("admit", "prefill", "decode": what the host spent
        # issuing them and waiting for their results), and the model forwards each phase ran
        self.phase_seconds = {"admit": 0.0, "prefill": 0.0, "decode": 0.0}
        self.forwards = {"prefill": 0, "decode": 0}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)

    def finished(self, reason: str) -> None:
        with self.lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1

    def text(self, waiting: int, running: int) -> str:
        p = "mimo_flash"
        with self.lock:
            lines = [f"# HELP {p}_requests_total Requests finished, by finish reason.",
                     f"# TYPE {p}_requests_total counter"]
            lines += [f'{p}_requests_total{{finish_reason="{k}"}} {v}' for k, v in sorted(self.requests.items())]
            for name, v, help_ in (
                    ("requests_rejected_total", self.rejected, "Requests refused because the queue was full."),
                    ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens processed."),
                    ("prompt_tokens_cached_total", self.cached_prompt_tokens,
                     "Prompt tokens whose KV came from the prefix cache."),
                    ("generation_tokens_total", self.generation_tokens, "Tokens generated."),
                    ("spec_decode_draft_tokens_total", self.spec_draft_tokens,
                     "MTP draft tokens verified (speculative decoding)."),
                    ("spec_decode_accepted_tokens_total", self.spec_accepted_tokens,
                     "MTP draft tokens accepted by verification.")):
                lines += [f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} counter", f"{p}_{name} {v}"]
            if self.spec_steps:
                name = f"{p}_spec_decode_steps_total"
                lines += [f"# HELP {name} Decode steps of speculating requests, by drafts per request (k; "
                          f"0: a plain step).", f"# TYPE {name} counter"]
                lines += [f'{name}{{k="{k}"}} {v}' for k, v in sorted(self.spec_steps.items())]
            name = f"{p}_scheduler_seconds_total"
            lines += [f"# HELP {name} The scheduler thread's wall time in each phase of its steps.",
                      f"# TYPE {name} counter"]
            lines += [f'{name}{{phase="{k}"}} {v}' for k, v in self.phase_seconds.items()]
            name = f"{p}_forwards_total"
            lines += [f"# HELP {name} Model forwards run, by phase.", f"# TYPE {name} counter"]
            lines += [f'{name}{{phase="{k}"}} {v}' for k, v in self.forwards.items()]
            for name, v, help_ in (("num_requests_waiting", waiting, "Requests queued for a slot."),
                                   ("num_requests_running", running, "Requests holding a slot.")):
                lines += [f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} gauge", f"{p}_{name} {v}"]
            for name, h, help_ in (("time_to_first_token_seconds", self.ttft, "Time to first token."),
                                   ("time_per_output_token_seconds", self.tpot,
                                    "Mean time per output token after the first, per request.")):
                lines += [f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} histogram"] + h.lines(f"{p}_{name}")
        return "\n".join(lines) + "\n"
