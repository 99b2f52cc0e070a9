// An HTTP request mix at a fixed arrival rate: 80% small (64 B) and 20% larger (16 KiB)
// responses. Each request uses a new connection unless REUSE=1, so the first packet of every
// flow goes through the service lookup. Reports latency percentiles under that fixed load.
//   k6 run -e TARGET=http://10.96.0.10 -e RATE=200 -e DURATION=30s bench/k6/http-mix.js
// The servers answer `GET /?bytes=N` with N bytes; against other servers the query is ignored.
import http from 'k6/http';
import { check } from 'k6';

export const options = {
  noConnectionReuse: __ENV.REUSE !== '1',
  scenarios: {
    mix: {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.RATE || 200),
      timeUnit: '1s',
      duration: __ENV.DURATION || '10s',
      preAllocatedVUs: 32,
      maxVUs: 256,
    },
  },
  summaryTrendStats: ['med', 'p(90)', 'p(99)', 'max'],
  thresholds: { checks: ['rate>0.99'] },
};

export default function () {
  const bytes = Math.random() < 0.8 ? 64 : 16384;
  const res = http.get(`${__ENV.TARGET}/?bytes=${bytes}`, { timeout: '2s' });
  check(res, { 'status is 200': (r) => r.status === 200 });
}
