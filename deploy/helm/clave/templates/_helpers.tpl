{{/* Resource name of one service: <release>-<service> (e.g. clave-identity). */}}
{{- define "clave.name" -}}
{{- printf "%s-%s" .root.Release.Name .service | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "clave.labels" -}}
app.kubernetes.io/name: clave
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "clave.selector" -}}
app.kubernetes.io/name: clave
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .service }}
{{- end -}}

{{- define "clave.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
{{- end -}}

{{/* Kafka client settings every Clave container shares (the job too). */}}
{{- define "clave.kafkaEnv" -}}
- name: CLAVE_ENV
  value: production
- name: KAFKA_BOOTSTRAP_SERVERS
  value: {{ required "kafka.bootstrapServers is required" .Values.kafka.bootstrapServers | quote }}
- name: KAFKA_SECURITY_PROTOCOL
  value: {{ .Values.kafka.securityProtocol | quote }}
- name: KAFKA_SASL_MECHANISM
  value: {{ .Values.kafka.saslMechanism | quote }}
{{- if .Values.kafka.caSecret.name }}
- name: KAFKA_SSL_CAFILE
  value: /etc/clave/kafka-ca/{{ .Values.kafka.caSecret.key }}
{{- end }}
- name: KAFKA_TOPIC_PARTITIONS
  value: {{ .Values.kafka.topicPartitions | quote }}
{{- end -}}

{{- define "clave.volumes" -}}
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: 64Mi
{{- if .Values.kafka.caSecret.name }}
- name: kafka-ca
  secret:
    secretName: {{ .Values.kafka.caSecret.name }}
    items:
      - key: {{ .Values.kafka.caSecret.key }}
        path: {{ .Values.kafka.caSecret.key }}
{{- end }}
{{- end -}}

{{- define "clave.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.kafka.caSecret.name }}
- name: kafka-ca
  mountPath: /etc/clave/kafka-ca
  readOnly: true
{{- end }}
{{- end -}}

{{/* Refuse values that would leave consumers idle: each instance runs consumerWorkers
     consumers on a hot topic (hashingConsumerWorkers on an argon2 one), and a partition has
     one consumer per group. */}}
{{- define "clave.checkScale" -}}
{{- $max := ternary .Values.autoscaling.maxReplicas .Values.replicas .Values.autoscaling.enabled | int -}}
{{- $workers := max (.Values.kafka.consumerWorkers | int) (.Values.kafka.hashingConsumerWorkers | int) -}}
{{- $consumers := mul $max $workers -}}
{{- if gt $consumers (.Values.kafka.topicPartitions | int) -}}
{{- fail (printf "%d instances x %d consumer workers = %d consumers for %d partitions: raise kafka.topicPartitions (and repartition), or lower the replicas" $max $workers $consumers (.Values.kafka.topicPartitions | int)) -}}
{{- end -}}
{{- end -}}
