/** Pads every column to its widest cell (the last column isn't padded), one string per row. */
export function alignRows(rows: string[][]): string[] {
  const widths = rows.reduce<number[]>((w, r) => r.map((c, i) => Math.max(w[i] ?? 0, c.length)), [])
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i] ?? 0))).join('  '))
}

export const table = (rows: string[][]): string => alignRows(rows).join('\n')
