// Stop strings over streamed text: the output ends just before the first stop string, and while the text
// so far ends in what could be the start of a stop string, that tail is held back (a client must never
// see text that a later token turns into a stop string).

export interface StopScan {
  /** Text that is safe to hand out now. */
  text: string;
  /** A stop string appeared: nothing after `text` is ever handed out. */
  stopped: boolean;
}

export class StopStringMatcher {
  private held = "";
  private stopped = false;

  constructor(private readonly stopStrings: readonly string[]) {
    if (stopStrings.some((stop) => stop === "")) throw new Error("a stop string must not be empty");
  }

  push(text: string): StopScan {
    if (this.stopped) return { text: "", stopped: true };
    const pending = this.held + text;
    const stopAt = this.firstStop(pending);
    if (stopAt >= 0) {
      this.stopped = true;
      this.held = "";
      return { text: pending.slice(0, stopAt), stopped: true };
    }
    const keep = this.longestStopPrefixSuffix(pending);
    this.held = pending.slice(pending.length - keep);
    return { text: pending.slice(0, pending.length - keep), stopped: false };
  }

  /** The end of the stream: what was held back is not the start of a stop string after all. */
  flush(): string {
    const rest = this.stopped ? "" : this.held;
    this.held = "";
    return rest;
  }

  private firstStop(text: string): number {
    let first = -1;
    for (const stop of this.stopStrings) {
      const at = text.indexOf(stop);
      if (at >= 0 && (first < 0 || at < first)) first = at;
    }
    return first;
  }

  /** Length of the longest end of `text` that is a proper beginning of some stop string. */
  private longestStopPrefixSuffix(text: string): number {
    let longest = 0;
    for (const stop of this.stopStrings) {
      for (let length = Math.min(stop.length - 1, text.length); length > longest; length--) {
        if (text.endsWith(stop.slice(0, length))) {
          longest = length;
          break;
        }
      }
    }
    return longest;
  }
}
