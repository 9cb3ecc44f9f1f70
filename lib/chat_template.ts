// Chat templates the way Hugging Face ships them: a Jinja template in tokenizer_config.json ("chat_template",
// a string or a list of named templates), or in chat_template.jinja / chat_template.json beside it
// (newer transformers versions write those). Rendered with @huggingface/jinja.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { Template } from "@huggingface/jinja";

export interface ChatMessage {
  role: string;
  content: string;
  name?: string;
}

/** The model has no (usable) chat template, or the template refused the conversation. */
export class ChatTemplateError extends Error {}

const SPECIAL_TOKEN_KEYS = ["bos_token", "eos_token", "pad_token", "unk_token"] as const;

export class ChatTemplate {
  private constructor(
    private readonly template: Template | undefined,
    /** Why chat is unavailable; null when the template parsed. */
    readonly unavailableReason: string | null,
    private readonly specialTokens: Record<string, string>,
  ) {}

  /** A folder without a usable template gives a ChatTemplate whose render() says why (chat requests then
   * fail with that message, completions keep working); only a tokenizer_config.json that is not JSON throws. */
  static load(directory: string): ChatTemplate {
    const config = readJsonObject(join(directory, "tokenizer_config.json"));
    const specialTokens: Record<string, string> = {};
    for (const key of SPECIAL_TOKEN_KEYS) {
      const token = tokenText(config?.[key]);
      if (token !== undefined) specialTokens[key] = token;
    }
    const source = templateSource(directory, config);
    if (source === undefined) {
      return new ChatTemplate(
        undefined,
        `the model in ${directory} has no chat template (no "chat_template" in tokenizer_config.json, ` +
          "no chat_template.jinja): use /v1/completions with a prompt instead",
        specialTokens,
      );
    }
    try {
      return new ChatTemplate(new Template(source), null, specialTokens);
    } catch (error) {
      return new ChatTemplate(
        undefined,
        `the model's chat template does not parse: ${(error as Error).message}`,
        specialTokens,
      );
    }
  }

  get available(): boolean {
    return this.template !== undefined;
  }

  /** The prompt text for `messages`, ending where the assistant's reply starts (without that cue when
   * addGenerationPrompt is false). */
  render(messages: readonly ChatMessage[], { addGenerationPrompt = true } = {}): string {
    if (!this.template) throw new ChatTemplateError(this.unavailableReason ?? "no chat template");
    try {
      return this.template.render({
        ...this.specialTokens,
        messages: messages.map((message) => ({ ...message })),
        add_generation_prompt: addGenerationPrompt,
      });
    } catch (error) {
      // Templates reject conversations they cannot express (raise_exception), e.g. roles out of turn.
      throw new ChatTemplateError(`the chat template rejected the messages: ${(error as Error).message}`);
    }
  }
}

function readJsonObject(file: string): Record<string, unknown> | undefined {
  if (!existsSync(file)) return undefined;
  const parsed: unknown = JSON.parse(readFileSync(file, "utf8"));
  return typeof parsed === "object" && parsed !== null && !Array.isArray(parsed)
    ? (parsed as Record<string, unknown>)
    : undefined;
}

/** Special tokens are strings, or AddedToken objects {content: "..."}. */
function tokenText(value: unknown): string | undefined {
  if (typeof value === "string") return value;
  if (
    typeof value === "object" &&
    value !== null &&
    typeof (value as { content?: unknown }).content === "string"
  ) {
    return (value as { content: string }).content;
  }
  return undefined;
}

function templateSource(directory: string, config: Record<string, unknown> | undefined): string | undefined {
  const fromConfig = namedTemplate(config?.chat_template);
  if (fromConfig !== undefined) return fromConfig;
  const jinjaFile = join(directory, "chat_template.jinja");
  if (existsSync(jinjaFile)) return readFileSync(jinjaFile, "utf8");
  return namedTemplate(readJsonObject(join(directory, "chat_template.json"))?.chat_template);
}

/** A template string, or from a list of {name, template} the one named "default". */
function namedTemplate(value: unknown): string | undefined {
  if (typeof value === "string" && value !== "") return value;
  if (!Array.isArray(value)) return undefined;
  const entries = value.filter(
    (entry): entry is { name: string; template: string } =>
      typeof entry === "object" &&
      entry !== null &&
      typeof (entry as { name?: unknown }).name === "string" &&
      typeof (entry as { template?: unknown }).template === "string",
  );
  return entries.find((entry) => entry.name === "default")?.template;
}
