"""What the env's ``render()`` shows: the engine's state at a decision point, as text
(``ansi``, ``human``) or as an image (``rgb_array``: what stable-baselines3's ``make_vec_env``
asks for by default and ``VecVideoRecorder`` films).

Both draw one ``Frame``: the queue (each waiting request's uncomputed tokens and its wait
against the TTFT SLO), the prefill batches in flight (stage of G), the decode batch's context
lengths, KV use, arrivals, misses and energy so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lpenv.episode import Episode

QUEUE_ROWS = 12  # waiting requests drawn (the text shows the first 8)
SIZE_PX = (640, 480)


@dataclass(frozen=True)
class Frame:
    time_s: float
    arrived: int
    to_come: int
    missed: int
    energy_j: float
    ttft_slo_s: float
    queue_len: int
    queue: tuple[tuple[str, int, float], ...]  # (request, uncomputed tokens, wait s)
    # (batch id, stage (0-based), G, tokens, member requests)
    batches: tuple[tuple[int, int, int, int, tuple[str, ...]], ...]
    decode_context: tuple[int, ...]
    kv_used: float  # share of the KV blocks held

    @classmethod
    def of(cls, ep: Episode) -> Frame:
        sched, blocks = ep.engine.scheduler, ep.engine.blocks
        now = ep.now
        waiting = list(sched.waiting)
        return cls(
            time_s=now, arrived=len(ep.recorder.requests), to_come=len(ep.pending),
            missed=len(ep.rewards.missed), energy_j=ep.recorder.energy_j,
            ttft_slo_s=ep.slo.ttft_s, queue_len=len(waiting),
            queue=tuple((r.request_id, r.num_uncomputed, now - r.arrival_time)
                        for r in waiting[:QUEUE_ROWS]),
            batches=tuple((b.batch_id, b.stage, b.num_groups,
                           sum(s.length for s in b.segments),
                           tuple(s.request_id for s in b.segments)) for b in sched.batches),
            decode_context=tuple(r.num_tokens for r in sched.decoding),
            kv_used=1.0 - blocks.num_free / blocks.num_blocks if blocks.num_blocks else 0.0)

    def text(self) -> str:
        lines = [f"t={self.time_s:8.3f}s  arrived={self.arrived}  pending={self.to_come}  "
                 f"missed={self.missed}  energy={self.energy_j:.2f} J"]
        queue = " ".join(f"{rid}({tokens}t,{wait:.2f}s)" for rid, tokens, wait in self.queue[:8])
        lines.append(f"queue[{self.queue_len}]: {queue or '-'}")
        for batch_id, stage, groups, tokens, members in self.batches:
            bar = "".join("#" if i == stage else ("=" if i < stage else ".")
                          for i in range(groups))
            lines.append(f"batch {batch_id}: stage {stage + 1}/{groups} [{bar}] "
                         f"{tokens}t {','.join(members)}")
        ctx = self.decode_context
        lines.append(f"decode[{len(ctx)}]: ctx " + (f"{min(ctx)}..{max(ctx)}" if ctx else "-"))
        return "\n".join(lines)


class FramePainter:
    """Draws frames as RGB arrays on one reused matplotlib figure (off screen)."""

    def __init__(self, size_px: tuple[int, int] = SIZE_PX, dpi: int = 80) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        # A Figure of its own, not pyplot's: no global state, nothing left open.
        self.figure = Figure(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
        self.canvas = FigureCanvasAgg(self.figure)

    def paint(self, frame: Frame) -> np.ndarray:
        fig = self.figure
        fig.clear()
        queue_ax, batch_ax, decode_ax = fig.subplots(
            3, 1, gridspec_kw={"height_ratios": [3, 1.2, 1.6], "hspace": 0.6})
        fig.suptitle(f"t = {frame.time_s:.3f} s   arrived {frame.arrived} (to come "
                     f"{frame.to_come})   missed {frame.missed}   {frame.energy_j:.1f} J   "
                     f"KV {frame.kv_used:.0%}", fontsize=10)

        # The queue, head on top; red as a request's wait nears the TTFT SLO.
        queue_ax.set_title(f"queue: {frame.queue_len} waiting (uncomputed tokens; colour: "
                           f"wait / TTFT SLO)", fontsize=9)
        if frame.queue:
            waits = np.clip([w / frame.ttft_slo_s for _, _, w in frame.queue], 0.0, 1.0)
            colors = [(w, 0.7 * (1 - w), 0.2) for w in waits]
            y = np.arange(len(frame.queue))
            queue_ax.barh(y, [t for _, t, _ in frame.queue], color=colors)
            queue_ax.set_yticks(y, [rid for rid, _, _ in frame.queue], fontsize=6)
        else:
            queue_ax.set_yticks([])
        queue_ax.set_ylim(QUEUE_ROWS - 0.5, -0.5)  # the head on top, rows of one height
        queue_ax.tick_params(labelsize=7)

        # Batches in flight: a cell per layer group, done / running / to come.
        batch_ax.set_title(f"prefill batches in flight: {len(frame.batches)}", fontsize=9)
        for row, (batch_id, stage, groups, tokens, _) in enumerate(frame.batches):
            for g in range(groups):
                color = "0.55" if g < stage else ("tab:orange" if g == stage else "0.92")
                batch_ax.add_patch(_cell(g / groups, row, 1 / groups, color))
            batch_ax.text(1.01, row + 0.4, f"#{batch_id} {stage + 1}/{groups}, {tokens}t",
                          fontsize=7, va="center")
        batch_ax.set_xlim(0, 1.25)
        batch_ax.set_ylim(max(len(frame.batches), 1), 0)
        batch_ax.set_xticks([])
        batch_ax.set_yticks([])

        # The decode batch: every request passes every layer every iteration.
        ctx = frame.decode_context
        decode_ax.set_title(f"decode batch: {len(ctx)} requests (context lengths)", fontsize=9)
        if ctx:
            decode_ax.bar(np.arange(len(ctx)), ctx, color="tab:blue", width=0.8)
        decode_ax.set_xticks([])
        decode_ax.tick_params(labelsize=7)

        self.canvas.draw()
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()

    def close(self) -> None:
        self.figure.clear()


def _cell(x: float, row: int, width: float, color: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x, row + 0.1), width, 0.8, facecolor=color, edgecolor="white")
