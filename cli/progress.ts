// A one-line progress bar on a terminal: `pearl bench` runs for minutes. It redraws in place (carriage
// return), at most ten times a second, and clears its line when done, so that what the command prints on
// stdout (a table, or JSON for a pipe) is not mixed with it.

const WIDTH = 28;
const REDRAW_MS = 100;

export class ProgressBar {
  private readonly started = performance.now();
  private lastDrawn = 0;

  constructor(private readonly stream: NodeJS.WriteStream) {}

  update(done: number, total: number, label: string): void {
    const now = performance.now();
    if (done < total && now - this.lastDrawn < REDRAW_MS) return;
    this.lastDrawn = now;
    const fraction = total > 0 ? Math.min(1, done / total) : 1;
    const filled = Math.round(fraction * WIDTH);
    const elapsed = (now - this.started) / 1000;
    // The rest at the pace so far: cells differ in speed, so this is a rough figure.
    const remaining = done > 0 ? (elapsed * (total - done)) / done : undefined;
    const line =
      `[${"#".repeat(filled)}${".".repeat(WIDTH - filled)}] ${(100 * fraction).toFixed(0).padStart(3)}% ` +
      `${done}/${total} requests, ${clock(elapsed)} elapsed` +
      (remaining === undefined ? "" : `, ~${clock(remaining)} left`) +
      ` | ${label}`;
    const columns = this.stream.columns ?? 120;
    this.stream.write(`\r${line.slice(0, columns - 1).padEnd(columns - 1)}`);
  }

  finish(): void {
    const columns = this.stream.columns ?? 120;
    this.stream.write(`\r${" ".repeat(columns - 1)}\r`);
  }
}

function clock(seconds: number): string {
  const whole = Math.round(seconds);
  return `${Math.floor(whole / 60)}:${String(whole % 60).padStart(2, "0")}`;
}
