/** NATadm's version, printed by `--version` and sent nowhere on the wire. */
export const VERSION = "0.1.0";
