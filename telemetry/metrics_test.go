package telemetry

import "testing"

func TestSumWhere(t *testing.T) {
	m := NewMetrics()
	m.HTTPRequests.WithLabelValues("a:80", "200").Add(3)
	m.HTTPRequests.WithLabelValues("a:80", "503").Add(2)
	m.HTTPRequests.WithLabelValues("b:80", "200").Add(5)
	m.HTTPDuration.WithLabelValues("a:80").Observe(0.1)
	m.HTTPDuration.WithLabelValues("a:80").Observe(0.2)
	m.ActiveLanes.Set(7)
	for _, tt := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"orderly_http_requests_total", nil, 10},
		{"orderly_http_requests_total", map[string]string{"host": "a:80"}, 5},
		{"orderly_http_requests_total", map[string]string{"host": "a:80", "status": "200"}, 3},
		{"orderly_http_requests_total", map[string]string{"status": "200"}, 8},
		{"orderly_http_requests_total", map[string]string{"host": "c:80"}, 0},
		{"orderly_http_requests_total", map[string]string{"nosuchlabel": "x"}, 0},
		{"orderly_http_request_duration_seconds", map[string]string{"host": "a:80"}, 2}, // samples
		{"orderly_active_lanes", nil, 7},
		{"orderly_no_such_metric", nil, 0},
	} {
		if got := m.SumWhere(tt.name, tt.labels); got != tt.want {
			t.Errorf("SumWhere(%s, %v) = %v, want %v", tt.name, tt.labels, got, tt.want)
		}
	}
	if got := m.Sum("orderly_http_requests_total"); got != 10 {
		t.Errorf("Sum = %v, want 10", got)
	}
}
