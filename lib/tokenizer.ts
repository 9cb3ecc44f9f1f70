// Text in and out, when the model pair ships a Hugging Face tokenizer (tokenizer.json, optionally
// tokenizer_config.json). Without one the services speak token ids only.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { Tokenizer } from "@huggingface/tokenizers";

export class TextTokenizer {
  private constructor(
    private readonly tokenizer: Tokenizer,
    /** No text of n tokens is longer than n times this many characters. */
    private readonly maxCharsPerToken: number,
  ) {}

  /** undefined when the folder holds no tokenizer.json. */
  static load(directory: string): TextTokenizer | undefined {
    const tokenizerFile = join(directory, "tokenizer.json");
    if (!existsSync(tokenizerFile)) return undefined;
    const configFile = join(directory, "tokenizer_config.json");
    const tokenizerJson: unknown = JSON.parse(readFileSync(tokenizerFile, "utf8"));
    const configJson: unknown = existsSync(configFile) ? JSON.parse(readFileSync(configFile, "utf8")) : {};
    return new TextTokenizer(
      new Tokenizer(tokenizerJson as object, configJson as object),
      maxCharsPerToken(tokenizerJson as TokenizerJson),
    );
  }

  /** The longest text that can encode to `tokens` tokens (an upper bound). */
  maxTextLength(tokens: number): number {
    return tokens * this.maxCharsPerToken;
  }

  /** addSpecialTokens false for text that already holds them, such as a rendered chat template. */
  encode(text: string, { addSpecialTokens = true } = {}): number[] {
    return this.tokenizer.encode(text, { add_special_tokens: addSpecialTokens }).ids;
  }

  decode(tokenIds: number[]): string {
    // The library throws on an empty list.
    return tokenIds.length === 0 ? "" : this.tokenizer.decode(tokenIds, { skip_special_tokens: true });
  }

  /** One token's text on its own, special tokens included (as OpenAI's logprobs name tokens). A token
   * holding part of a multi-byte character reads as U+FFFD. */
  tokenText(tokenId: number): string {
    return this.tokenizer.decode([tokenId], { skip_special_tokens: false });
  }

  /** The vocabulary's string for a token (byte-level BPE's Ġ for a space, say); undefined outside it. */
  tokenString(tokenId: number): string | undefined {
    return this.tokenizer.id_to_token(tokenId);
  }

  /** Turns a stream of token ids into a stream of text. */
  streamDecoder(): StreamDecoder {
    return new StreamDecoder(this);
  }
}

/**
 * Incremental detokenization: a token may hold half of a multi-byte character, and a tokenizer may merge
 * spaces across tokens, so each new piece of text is the difference between decoding a short window with
 * and without the new tokens, held back while it ends in an incomplete character (U+FFFD).
 */
export class StreamDecoder {
  private readonly tokens: number[] = [];
  /** Start of the window decoded for context. */
  private prefixOffset = 0;
  /** Tokens up to here have been turned into text. */
  private readOffset = 0;

  constructor(private readonly tokenizer: TextTokenizer) {}

  push(tokenIds: number[]): string {
    this.tokens.push(...tokenIds);
    const prefixText = this.tokenizer.decode(this.tokens.slice(this.prefixOffset, this.readOffset));
    const fullText = this.tokenizer.decode(this.tokens.slice(this.prefixOffset));
    if (fullText.length <= prefixText.length || fullText.endsWith("\uFFFD")) return "";
    this.prefixOffset = this.readOffset;
    this.readOffset = this.tokens.length;
    return fullText.slice(prefixText.length);
  }

  /** Whatever is held back, at the end of the stream. */
  flush(): string {
    const prefixText = this.tokenizer.decode(this.tokens.slice(this.prefixOffset, this.readOffset));
    const fullText = this.tokenizer.decode(this.tokens.slice(this.prefixOffset));
    this.prefixOffset = this.readOffset = this.tokens.length;
    return fullText.length > prefixText.length ? fullText.slice(prefixText.length) : "";
  }
}

interface TokenizerJson {
  normalizer?: unknown;
  model?: { vocab?: Record<string, number> | [string, number][] };
  added_tokens?: { content: string }[];
}

/**
 * Every token stands for at most as many characters as its own longest spelling: byte-level vocabularies
 * spell one byte per character, SentencePiece ones a character (or a byte, <0x41>) per character or more.
 * A normalizer may shrink text before that (NFC composes a few code points into one): 4 covers it.
 */
function maxCharsPerToken(json: TokenizerJson): number {
  const vocab = json.model?.vocab ?? {};
  const spellings = Array.isArray(vocab) ? vocab.map(([piece]) => piece) : Object.keys(vocab);
  let longest = 1;
  for (const piece of spellings) longest = Math.max(longest, piece.length);
  for (const token of json.added_tokens ?? []) longest = Math.max(longest, token.content.length);
  return json.normalizer ? 4 * longest : longest;
}
