// The decoding modes, by name (configuration, the CLI's --mode, REST's `decoding`, logs and metric labels)
// and as gateway.proto's enum DecodingMode, whose UNSPECIFIED (0) stands for the server's default. This is
// the one table between the two.
import { DecodingMode as DecodingModeProto } from "../proto/gen/pearl/v1/gateway.js";

export type DecodingMode = "pearl" | "sd" | "ar";
export const DECODING_MODES: readonly DecodingMode[] = ["pearl", "sd", "ar"];

/** Each mode's value in the proto enum. */
export const PROTO_MODES: Readonly<Record<DecodingMode, DecodingModeProto>> = {
  pearl: DecodingModeProto.DECODING_MODE_PEARL,
  sd: DecodingModeProto.DECODING_MODE_SD,
  ar: DecodingModeProto.DECODING_MODE_AR,
};

const MODES_BY_PROTO = new Map(DECODING_MODES.map((mode) => [PROTO_MODES[mode], mode]));

/** The mode a proto value names; undefined for UNSPECIFIED and for a value this build does not know. */
export function modeFromProto(value: DecodingModeProto): DecodingMode | undefined {
  return MODES_BY_PROTO.get(value);
}

export function isDecodingMode(value: unknown): value is DecodingMode {
  return (DECODING_MODES as readonly unknown[]).includes(value);
}
