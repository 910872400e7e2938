/**
 * Text that came from the network (a join endpoint's refusal, a field of a reply)
 * is printed only after passing through `printable`, so a hostile peer can't
 * drive the reader's terminal (colours, cursor moves, window titles, OSC 52
 * clipboard writes), forge extra lines of output, or reorder what is shown with
 * bidi overrides.
 */

/** The longest piece of network text we print, in characters. */
export const MAX_PRINTED = 200

// Whole escape sequences go first, so their parameters don't survive as visible junk:
// CSI (ESC [ or the 8-bit 0x9b) with its parameter and final bytes; OSC, DCS, SOS, PM and
// APC strings (ESC ] P X ^ _ or their 8-bit forms) up to BEL or the string terminator, or
// to the end of the text when unterminated; and any other ESC with its intermediate and
// final bytes (charset switches, keypad modes).
// eslint-disable-next-line no-control-regex -- matching control characters is the point
const ESCAPES = /(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?|\x1b[\x20-\x2f]*[\x30-\x7e]?/g
// C0 (tab and newline too: one error, one line), DEL, C1, the line and paragraph
// separators, and the bidi embedding, override and isolate controls.
// eslint-disable-next-line no-control-regex -- as above
const CONTROLS = /[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g

/**
 * Returns `text` with escape sequences removed, every other control character
 * replaced by U+FFFD, and at most `max` characters (code points), ending in "…"
 * when cut.
 */
export function printable(text: string, max = MAX_PRINTED): string {
  const clean = text.replace(ESCAPES, '').replace(CONTROLS, '\uFFFD')
  const chars = Array.from(clean)
  return chars.length <= max ? clean : `${chars.slice(0, Math.max(0, max - 1)).join('')}…`
}

/** `printable`, for bytes that should be UTF-8 (anything else shows as U+FFFD). */
export function printableBytes(bytes: Uint8Array, max = MAX_PRINTED): string {
  // Four bytes per character is the most UTF-8 needs, plus room for escape sequences that go.
  return printable(Buffer.from(bytes.subarray(0, max * 16)).toString('utf8'), max)
}
