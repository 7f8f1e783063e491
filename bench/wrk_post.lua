-- wrk script: posts pre-built raw HTTP requests in rotation (bench/payloads.py writes them).
--   wrk -t1 -c32 -d10s -s bench/wrk_post.lua http://127.0.0.1:PORT -- REQUESTS_FILE [START]
-- REQUESTS_FILE holds the requests back to back; REQUESTS_FILE.idx one "offset length" per line.
-- Nothing is formatted per request: request() returns a string built once in init().

local requests = {}
local position = 0

function init(args)
  local path = args[1]
  local handle = assert(io.open(path, "rb"))
  local data = handle:read("*a")
  handle:close()
  for line in io.lines(path .. ".idx") do
    local offset, length = line:match("(%d+) (%d+)")
    offset, length = tonumber(offset), tonumber(length)
    requests[#requests + 1] = data:sub(offset + 1, offset + length)
  end
  position = tonumber(args[2] or "0") % #requests
end

function request()
  position = position % #requests + 1
  return requests[position]
end

function done(summary, latency, _)
  local errors = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "min_us": %d, "mean_us": %.1f, "max_us": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, errors.connect, errors.read, errors.write,
    errors.status, errors.timeout, latency.min, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
