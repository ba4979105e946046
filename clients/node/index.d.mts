// Types of the ESM entry (index.mjs): the same exports as index.d.ts, by name and as the default.
import * as ps from './index.js';

export * from './index.js';
export default ps;
