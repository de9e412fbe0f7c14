--- m31r.text: pure text logic of the ghost text (what is shown, what a partial accept takes); no editor
--- state, so the tests call it directly.
local M = {}

--- The part of a completion still to show at the cursor.
--- `typed` is the buffer text between the item's range start and the cursor (on the cursor line): text the
--- user has already typed that the item repeats. Returns nil when the item does not start with it (the
--- item is stale) or when nothing is left to show.
---@param insert_text string
---@param typed string
---@return string|nil
function M.remaining(insert_text, typed)
  if insert_text:sub(1, #typed) ~= typed then
    return nil
  end
  local rest = insert_text:sub(#typed + 1)
  if rest == "" then
    return nil
  end
  return rest
end

--- The next line of `text` to accept: up to (not including) the first newline, or, when `text` starts with
--- a newline, that newline and the following line's text.
---@param text string
---@return string
function M.next_line(text)
  local first = text:match("^[^\n]*")
  if first ~= "" then
    return first
  end
  return text:match("^\n[^\n]*") or text
end

--- The next word of `text` to accept: leading blanks plus a run of word characters, or plus a run of other
--- non-blank characters (one punctuation run); a leading newline goes with the next line's indentation.
---@param text string
---@return string
function M.next_word(text)
  if text:sub(1, 1) == "\n" then
    return text:match("^\n[ \t]*")
  end
  -- Bytes >= 128 count as word characters so a UTF-8 character is never split.
  return text:match("^[ \t]*[%w_\128-\255]+")
    or text:match("^[ \t]*[^%w_%s\128-\255]+")
    or text:match("^[ \t]+")
    or text
end

--- Splits ghost text into the inline part (rest of the cursor line) and the lines shown below it.
---@param text string
---@return string first, string[] rest
function M.split(text)
  local lines = vim.split(text, "\n", { plain = true })
  local first = table.remove(lines, 1)
  return first, lines
end

--- Where the cursor ends after inserting `text` at (row, col) (0-based row, byte col).
---@return integer row, integer col
function M.end_position(row, col, text)
  local lines = vim.split(text, "\n", { plain = true })
  if #lines == 1 then
    return row, col + #lines[1]
  end
  return row + #lines - 1, #lines[#lines]
end

return M
