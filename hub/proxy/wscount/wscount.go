// Package wscount is a Traefik middleware (a local plugin, run by Traefik's Yaegi
// interpreter) that counts the bytes each upgraded connection -- a WebSocket: kernel output,
// terminals -- sends to its client. Traefik's access log reports 0 bytes for those.
//
// It sits after the hub's forwardAuth on every route to a user's server, so the request
// carries the enforcement point's X-Ztlab-Actor, X-Ztlab-Server and X-Ztlab-Route. Every
// FlushBytes bytes, every FlushSeconds seconds of traffic, and when the connection closes,
// it appends one JSON line {"actor", "server", "route", "bytes"} (the bytes since the last
// line) to LogFile, which the hub's egress accounting reads.
package wscount

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
	"time"
)

// Config of the middleware.
type Config struct {
	LogFile      string `json:"logFile,omitempty"`
	FlushBytes   int64  `json:"flushBytes,omitempty"`
	FlushSeconds int64  `json:"flushSeconds,omitempty"`
}

// CreateConfig makes the default configuration.
func CreateConfig() *Config {
	return &Config{FlushBytes: 1 << 20, FlushSeconds: 5}
}

type counter struct {
	next   http.Handler
	config *Config
	mu     sync.Mutex
}

// New makes the middleware.
func New(ctx context.Context, next http.Handler, config *Config, name string) (http.Handler, error) {
	if config.LogFile == "" {
		return nil, fmt.Errorf("wscount: logFile is required")
	}
	return &counter{next: next, config: config}, nil
}

func (c *counter) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	if req.Header.Get("Upgrade") == "" {
		c.next.ServeHTTP(rw, req)
		return
	}
	w := &writer{
		ResponseWriter: rw,
		counter:        c,
		actor:          req.Header.Get("X-Ztlab-Actor"),
		server:         req.Header.Get("X-Ztlab-Server"),
		route:          req.Header.Get("X-Ztlab-Route"),
	}
	c.next.ServeHTTP(w, req)
}

type writer struct {
	http.ResponseWriter
	counter              *counter
	actor, server, route string
}

// Hijack hands the reverse proxy a connection that counts what it writes.
func (w *writer) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	hijacker, ok := w.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, fmt.Errorf("wscount: the response writer cannot be hijacked")
	}
	conn, buffered, err := hijacker.Hijack()
	if err != nil {
		return conn, buffered, err
	}
	return &countingConn{Conn: conn, writer: w, since: time.Now()}, buffered, nil
}

// Flush passes a flush on (server-sent events and streamed answers).
func (w *writer) Flush() {
	if flusher, ok := w.ResponseWriter.(http.Flusher); ok {
		flusher.Flush()
	}
}

type countingConn struct {
	net.Conn
	writer *writer
	mu     sync.Mutex
	unsent int64
	since  time.Time
}

func (c *countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	config := c.writer.counter.config
	c.mu.Lock()
	c.unsent += int64(n)
	due := c.unsent >= config.FlushBytes || time.Since(c.since) >= time.Duration(config.FlushSeconds)*time.Second
	c.mu.Unlock()
	if due {
		c.flush()
	}
	return n, err
}

func (c *countingConn) Close() error {
	err := c.Conn.Close()
	c.flush()
	return err
}

func (c *countingConn) flush() {
	c.mu.Lock()
	sent := c.unsent
	c.unsent = 0
	c.since = time.Now()
	c.mu.Unlock()
	if sent > 0 {
		c.writer.counter.record(c.writer, sent)
	}
}

func (c *counter) record(w *writer, sent int64) {
	line, err := json.Marshal(map[string]interface{}{
		"actor": w.actor, "server": w.server, "route": w.route, "bytes": sent,
	})
	if err != nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	file, err := os.OpenFile(c.config.LogFile, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return
	}
	defer file.Close()
	file.Write(append(line, '\n'))
}
