#!/usr/bin/env node
// The published entry runs the compiled CLI; `npm install` builds it via `prepare`.
import '../dist/cli/main.js'
