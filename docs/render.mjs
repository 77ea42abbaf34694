// Render the AsyncAPI document to one self-contained HTML page with the AsyncAPI project's
// html-template (through @asyncapi/generator's library API; its `ag` command is deprecated).
// Works offline: the template is taken from docs/node_modules, nothing is fetched.
//
//   node docs/render.mjs [docs/asyncapi.yaml] [var/docs]
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import Generator from '@asyncapi/generator';

const here = path.dirname(fileURLToPath(import.meta.url));
const file = path.resolve(process.argv[2] ?? path.join(here, 'asyncapi.yaml'));
const out = path.resolve(process.argv[3] ?? path.join(here, '..', 'var', 'docs'));

// By path: a template named by its package name is looked up from the working directory and,
// when not found there, installed from the registry.
const template = path.join(here, 'node_modules', '@asyncapi', 'html-template');
const generator = new Generator(template, out, {
  forceWrite: true,
  templateParams: { singleFile: 'true' },
});
await generator.generateFromFile(file);
console.log(`written ${path.join(out, 'index.html')}`);
