-- Init for the Neovim under test: only this plugin, configured from the environment the driver
-- (tests/run.lua) sets: M31R_LSP (the m31r-lsp binary), M31R_TEST_SOCKET (the test daemon's socket).
local root = vim.fn.fnamemodify(debug.getinfo(1, "S").source:sub(2), ":p:h:h")
vim.opt.runtimepath:prepend(root)
vim.o.swapfile = false
vim.o.shada = ""
vim.lsp.log.set_level(vim.env.M31R_LSP_LOG_LEVEL or "warn")
require("m31r").setup({
  cmd = { vim.env.M31R_LSP, "--log-file", vim.env.M31R_LSP_LOG_FILE },
  -- The tiny seeded model's ghost text is gibberish (" y y y y"), which the confidence gate and the
  -- degenerate-output filters rightly hide: the tests expect ghost text, so both are off.
  settings = {
    socketPath = vim.env.M31R_TEST_SOCKET,
    autoStart = false,
    minConfidence = 0,
    degenerateFilters = false,
  },
  debounce_ms = 20,
})
