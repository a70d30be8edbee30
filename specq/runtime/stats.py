"""Statistics of one `specq.generate` call: per level and overall, printable as a table or a dict."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LevelStats:
    """One level of the chain. `drafted`/`accepted` count the tokens this level proposed to the level
    above it (summed over active rows), `rounds` the verifications of those proposals and
    `row_rounds` the same summed over the active rows of each; `forwards` and `time_s` are this
    level's own work (drafting or verifying), excluding the levels below it."""

    name: str
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    forwards: int = 0
    time_s: float = 0.0
    row_rounds: int = 0

    def add_round(self, drafted_per_row: int, accepted: int, active_rows: int) -> None:
        """One verification of this level's drafts over `active_rows` rows, `accepted` of them in all."""
        self.drafted += drafted_per_row * active_rows
        self.accepted += accepted
        self.rounds += 1
        self.row_rounds += active_rows

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Accepted tokens per verification round, per row."""
        return self.accepted / self.row_rounds if self.row_rounds else None

    def as_dict(self) -> dict:
        return dict(name=self.name, drafted=self.drafted, accepted=self.accepted,
                    acceptance_rate=self.acceptance_rate, mean_accepted_length=self.mean_accepted_length,
                    rounds=self.rounds, row_rounds=self.row_rounds, forwards=self.forwards, time_s=self.time_s)


@dataclass
class GenerationStats:
    levels: list[LevelStats]
    batch_size: int = 1
    prompt_tokens: int = 0
    new_tokens: int = 0  # summed over rows (up to and including EOS)
    time_s: float = 0.0
    kv_caches: list[dict] = field(default_factory=list)  # one entry per distinct model

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.time_s if self.time_s > 0 else 0.0

    def as_dict(self) -> dict:
        return dict(levels=[lvl.as_dict() for lvl in self.levels], batch_size=self.batch_size,
                    prompt_tokens=self.prompt_tokens, new_tokens=self.new_tokens, time_s=self.time_s,
                    tokens_per_s=self.tokens_per_s, kv_caches=self.kv_caches)

    def table(self) -> str:
        def fmt(x, spec):
            return "-" if x is None else format(x, spec)

        head = ("level", "drafted", "accepted", "accept rate", "mean accepted", "forwards", "time s")
        rows = [(lvl.name, str(lvl.drafted), str(lvl.accepted), fmt(lvl.acceptance_rate, ".3f"),
                 fmt(lvl.mean_accepted_length, ".2f"), str(lvl.forwards), f"{lvl.time_s:.3f}")
                for lvl in self.levels]
        widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(head)]
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
        out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in rows]
        out.append(f"{self.new_tokens} new tokens (batch {self.batch_size}) in {self.time_s:.3f} s: "
                   f"{self.tokens_per_s:.1f} tokens/s")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()
