// Validate the AsyncAPI document with the AsyncAPI project's own parser (@asyncapi/parser,
// the one its CLI, generator and Studio use): JSON Schema of the spec, then its Spectral rules.
//
//   node docs/validate.mjs [docs/asyncapi.yaml]
//
// Prints every diagnostic (errors, warnings, infos, hints) and exits 1 on any error.
import { Parser, fromFile } from '@asyncapi/parser';

const SEVERITY = ['error', 'warning', 'info', 'hint'];
const file = process.argv[2] ?? new URL('./asyncapi.yaml', import.meta.url).pathname;

const { document, diagnostics } = await fromFile(new Parser(), file).parse();
const counts = [0, 0, 0, 0];
for (const d of diagnostics) {
  counts[d.severity] += 1;
  const where = d.path.length ? d.path.join('.') : '(document)';
  const line = d.range ? `:${d.range.start.line + 1}` : '';
  console.log(`${SEVERITY[d.severity]} ${d.code} ${where}${line}: ${d.message}`);
}
const summary = SEVERITY.map((name, i) => `${counts[i]} ${name}s`).join(', ');
if (document === undefined || counts[0] > 0) {
  console.log(`${file}: INVALID (${summary})`);
  process.exit(1);
}
const channels = document.channels().length;
const operations = document.operations().length;
const messages = document.messages().length;
console.log(`${file}: valid AsyncAPI ${document.version()}: ${channels} channels, ${operations} operations, ${messages} messages (${summary})`);
