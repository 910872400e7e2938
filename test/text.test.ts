import { test } from 'node:test'
import assert from 'node:assert/strict'
import { MAX_PRINTED, printable, printableBytes } from '../src/util/text.ts'

test('printable leaves ordinary text alone', () => {
  const plain = 'the name "hub" is taken; join with another --name (café, 東京)'
  assert.equal(printable(plain), plain)
})

test('printable removes escape sequences whole and replaces other control characters', () => {
  assert.equal(printable('\x1b[31mred\x1b[0m'), 'red')
  assert.equal(printable('a\x1b[1;2;3 qb'), 'ab', 'CSI with parameters and an intermediate byte')
  assert.equal(printable('a\u009b2Jb'), 'ab', '8-bit CSI')
  assert.equal(printable('a\x1b]0;window title\x07b'), 'ab', 'OSC ended by BEL')
  assert.equal(printable('a\x1b]52;c;cm0gLXJmIH4=\x1b\\b'), 'ab', 'OSC 52 clipboard write ended by ST')
  assert.equal(printable('a\x1bP1$qm\x1b\\b'), 'ab', 'DCS')
  assert.equal(printable('a\x1b]8;;https://example.invalid'), 'a', 'an OSC left open runs to the end')
  assert.equal(printable('a\x1b(Bb\x1b=c'), 'abc', 'charset and keypad escapes')
  assert.equal(printable('a\x1b'), 'a', 'a lone ESC at the end')
  assert.equal(printable('one\ntwo\r\tthree\x00\x07\x7f\u0085'), 'one\uFFFDtwo\uFFFD\uFFFDthree\uFFFD\uFFFD\uFFFD\uFFFD')
  assert.equal(printable('abc\u202Efed\u2066x\u2069\u2028'), 'abc\uFFFDfed\uFFFDx\uFFFD\uFFFD', 'bidi controls and line separators')
})

test('printable caps the length in characters, never splitting one', () => {
  assert.equal(printable('x'.repeat(MAX_PRINTED)), 'x'.repeat(MAX_PRINTED))
  assert.equal(printable('x'.repeat(MAX_PRINTED + 1)), `${'x'.repeat(MAX_PRINTED - 1)}…`)
  assert.equal(printable('😀'.repeat(10), 5), '😀😀😀😀…')
})

test('printableBytes decodes UTF-8 and shows bad bytes as U+FFFD', () => {
  assert.equal(printableBytes(Buffer.from([0x68, 0x69, 0xff, 0x1b, 0x5b, 0x32, 0x4a])), 'hi\uFFFD')
  assert.equal(printableBytes(Buffer.alloc(1 << 20, 0x41), 10), `${'A'.repeat(9)}…`)
})
