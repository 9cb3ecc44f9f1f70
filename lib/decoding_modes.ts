// The decoding modes, by name (DecodingModeName: configuration, the CLI's --mode, REST's `decoding`, logs
// and metric labels) and as gateway.proto's enum DecodingMode, whose UNSPECIFIED (0) stands for the
// server's default. This is the one table between the two.
import { DecodingMode } from "../proto/gen/pearl/v1/gateway.js";

export type DecodingModeName = "pearl" | "sd" | "ar";
export const DECODING_MODE_NAMES: readonly DecodingModeName[] = ["pearl", "sd", "ar"];

/** Each mode's value in the proto enum. */
export const PROTO_MODES: Readonly<Record<DecodingModeName, DecodingMode>> = {
  pearl: DecodingMode.DECODING_MODE_PEARL,
  sd: DecodingMode.DECODING_MODE_SD,
  ar: DecodingMode.DECODING_MODE_AR,
};

const MODES_BY_PROTO = new Map(DECODING_MODE_NAMES.map((mode) => [PROTO_MODES[mode], mode]));

/** The mode a proto value names; undefined for UNSPECIFIED and for a value this build does not know. */
export function modeFromProto(value: DecodingMode): DecodingModeName | undefined {
  return MODES_BY_PROTO.get(value);
}

export function isDecodingModeName(value: unknown): value is DecodingModeName {
  return (DECODING_MODE_NAMES as readonly unknown[]).includes(value);
}
