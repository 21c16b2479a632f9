-- The one line every bench wrk script prints when it is done: "BENCH {json}" with the request count,
-- duration, errors, latency percentiles and the most requests one thread sent (bench/loads.py's
-- run_wrk reads it; the threads' "sent" counters tell the next run where numbering continues).
return function(threads, summary, latency)
  local most_sent = 0
  for _, thread in ipairs(threads) do
    most_sent = math.max(most_sent, thread:get("sent"))
  end
  local errors = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, '
      .. '"p50_us": %d, "p95_us": %d, "p99_us": %d, "most_sent_by_a_thread": %d}\n',
    summary.requests, summary.duration, errors.status, errors.connect + errors.read + errors.write + errors.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), most_sent
  ))
end
