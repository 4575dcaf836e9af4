"""What one sandboxed run produced, and the text an agent sees of it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SandboxResult:
    """What one run produced; ``killed_reason`` says why it was stopped, in words for the agent."""

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool = False
    killed_reason: str | None = None
    duration_s: float = 0.0
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed_reason is None

    def as_observation(self, max_chars: int = 4000, traceback_lines: int = 12) -> str:
        """The text an agent sees: stdout, then the last lines of stderr, then why it was stopped."""
        parts: list[str] = []
        out = self.stdout.rstrip("\n")
        if out:
            clipped = out[:max_chars]
            cut = self.stdout_truncated or len(out) > max_chars
            parts.append(clipped + ("\n... [output truncated]" if cut else ""))
        err = self.stderr.rstrip("\n")
        if err:
            lines = err.splitlines()
            tail = lines[-traceback_lines:]
            prefix = ["..."] if len(lines) > len(tail) or self.stderr_truncated else []
            parts.append(_clip_tail("\n".join(prefix + tail), max_chars))
        if self.killed_reason:
            parts.append(self.killed_reason)
        return "\n".join(parts) if parts else "(no output)"


def _clip_tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "... " + text[-limit:]
